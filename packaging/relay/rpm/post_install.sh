getent group fleetadm-relay >/dev/null || groupadd --system fleetadm-relay
getent passwd fleetadm-relay >/dev/null || useradd --system --gid fleetadm-relay \
    --home-dir /var/lib/fleetadm-relay --no-create-home --shell /sbin/nologin \
    --comment "fleetadm relay" fleetadm-relay
install -d -m 0700 -o fleetadm-relay -g fleetadm-relay /var/lib/fleetadm-relay
install -d -m 0755 /etc/fleetadm
if [ ! -e /var/lib/fleetadm-relay/relay.key ]; then
    runuser -u fleetadm-relay -- /usr/bin/fleetadm-relay --key-file /var/lib/fleetadm-relay/relay.key --print-public-key >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ $1 -eq 1 ]; then
        systemctl enable fleetadm-relay.service >/dev/null 2>&1 || :
        systemctl start fleetadm-relay.service >/dev/null 2>&1 || :
    else
        systemctl try-restart fleetadm-relay.service >/dev/null 2>&1 || :
    fi
fi
