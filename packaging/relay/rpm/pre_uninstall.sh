if [ $1 -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl disable --now fleetadm-relay.service >/dev/null 2>&1 || :
fi
