install -d -m 0700 /var/lib/node-agent
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ $1 -eq 1 ]; then
        systemctl enable node-agent.service >/dev/null 2>&1 || :
        systemctl start node-agent.service >/dev/null 2>&1 || :
    else
        systemctl try-restart node-agent.service >/dev/null 2>&1 || :
    fi
fi
