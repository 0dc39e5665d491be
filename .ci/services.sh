#!/usr/bin/env bash
# Installs the tools and starts the services the test suite talks to when they are not running
# already (machines of this kind start MariaDB and Redis before CI; a plain
# machine gets them from Debian's packages). Called by .ci/run.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# benches/e2e.sh polls the server's /health with curl.
command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl >/dev/null; }
# web/build.sh and web/test.sh: Node.js with npm, and the browser the chat
# page's test drives (Debian's chromium; puppeteer-core downloads nothing).
command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; }
command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; }

if ! port_open 3306; then
    echo "MariaDB not running: installing and starting it"
    command -v mariadbd >/dev/null || { apt-get update -qq && apt-get install -y -qq mariadb-server >/dev/null; }
    mkdir -p /run/mysqld && chown mysql /run/mysqld
    (mariadbd --user=mysql --bind-address=127.0.0.1 --port=3306 >/tmp/mariadb.log 2>&1 &)
    for _ in $(seq 50); do port_open 3306 && break; sleep 0.2; done
fi
if ! port_open 6379; then
    echo "Redis not running: installing and starting it"
    command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no
    for _ in $(seq 50); do port_open 6379 && break; sleep 0.2; done
fi
# The MySQL tests log in over TCP as an application user that may create
# and drop its own `pingme_*` databases (root may only log in over the
# local socket on a plain machine).
mysql -uroot <<'SQL'
CREATE USER IF NOT EXISTS 'pingme'@'127.0.0.1' IDENTIFIED BY 'pingme';
CREATE USER IF NOT EXISTS 'pingme'@'localhost' IDENTIFIED BY 'pingme';
GRANT ALL PRIVILEGES ON `pingme\_%`.* TO 'pingme'@'127.0.0.1', 'pingme'@'localhost';
SQL
port_open 3306 && echo "MariaDB up on 127.0.0.1:3306"
port_open 6379 && echo "Redis up on 127.0.0.1:6379"
