# Shell helpers shared by the bench/compare*.sh scripts. Sourced; the script defines
# note() (progress on stderr) before calling these.

# Prints N free TCP ports on 127.0.0.1, space-separated.
free_ports() { # N
    python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
PY
}

# Waits (up to 10 s) until something listens on 127.0.0.1:PORT; fails early if PID exits.
wait_for_port() { # PORT WHAT PID
    for _ in $(seq 1 200); do
        if ! kill -0 "$3" 2>/dev/null; then note "$2 exited"; return 1; fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    note "$2 is not listening on port $1"
    return 1
}

# Installs Debian packages without letting their post-install start services (nginx on
# port 80): a policy-rc.d denying starts is in place while apt runs. A caller's cleanup
# trap should remove /usr/sbin/policy-rc.d if added_policy_rc is 1 (interrupted here).
added_policy_rc=0
install_debian_packages() { # PACKAGE...
    note "installing Debian packages: $*"
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        added_policy_rc=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
    if [ "$added_policy_rc" = 1 ]; then rm -f /usr/sbin/policy-rc.d; added_policy_rc=0; fi
}
