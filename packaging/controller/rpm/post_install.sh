install -d -m 0700 /var/lib/fleetadm
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ $1 -eq 1 ]; then
        systemctl enable controller.service >/dev/null 2>&1 || :
        systemctl start controller.service >/dev/null 2>&1 || :
    else
        systemctl try-restart controller.service >/dev/null 2>&1 || :
    fi
fi
