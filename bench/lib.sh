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

# Starts nginx as a throwaway mutual-TLS server on 127.0.0.1:PORT with fleetcert's server
# certificate (+ the issuing CA) and the fleet chain as client CA (`ssl_verify_client on`,
# a static 200): the ceiling for a mutual-TLS server on this machine. Files go in DIR;
# sets nginx_pid, which the caller records for its cleanup before waiting for the port.
start_nginx_mtls() { # DIR PORT SERVER_CRT SERVER_KEY CHAIN_PEM
    local ngx=$1 port=$2 server_crt=$3 server_key=$4 chain=$5 module temp_paths=""
    mkdir -p "$ngx/tmp"
    { cat "$server_crt"; sed -n '1,/-----END CERTIFICATE-----/p' "$chain"; } >"$ngx/server-chain.pem"
    for module in proxy fastcgi uwsgi scgi; do
        if ! nginx -V 2>&1 | grep -q -- "--without-http_${module}_module"; then
            temp_paths+="    ${module}_temp_path $ngx/tmp/$module;"$'\n'
        fi
    done
    # OpenSSL wants a chain that ends at a self-signed root: the client CA file holds the
    # issuing CA and the root (`ca export --chain`), and the depth allows leaf -> issuing -> root.
    cat >"$ngx/nginx.conf" <<CONF
worker_processes 2;
daemon off;
pid $ngx/nginx.pid;
error_log $ngx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $ngx/tmp/body;
$temp_paths
    server {
        listen 127.0.0.1:$port ssl;
        ssl_certificate $ngx/server-chain.pem;
        ssl_certificate_key $server_key;
        ssl_client_certificate $chain;
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / { return 200 "ok"; }
    }
}
CONF
    nginx -p "$ngx" -c "$ngx/nginx.conf" -e "$ngx/error.log" >"$ngx/stdout.log" 2>&1 &
    nginx_pid=$!
}
