#!/bin/sh
# PostgreSQL of Debian's packages, started the way the official postgres image is: on first start the cluster is
# created with POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB; clients on the network log in with the password.
set -eu
BIN=/usr/lib/postgresql/15/bin
DATA=/var/lib/postgresql/data
mkdir -p "$DATA" /var/run/postgresql
chown postgres: "$DATA" /var/run/postgresql
if [ ! -s "$DATA/PG_VERSION" ]; then
    umask 077
    printf '%s\n' "$POSTGRES_PASSWORD" > /tmp/pgpass && chown postgres /tmp/pgpass
    su postgres -s /bin/sh -c "$BIN/initdb -D $DATA -E UTF8 --locale=C.UTF-8 -U $POSTGRES_USER --pwfile=/tmp/pgpass --auth-local=trust --auth-host=scram-sha-256"
    rm -f /tmp/pgpass
    echo "listen_addresses = '*'" >> "$DATA/postgresql.conf"
    echo "host all all all scram-sha-256" >> "$DATA/pg_hba.conf"
    su postgres -s /bin/sh -c "$BIN/pg_ctl -D $DATA -o '-c listen_addresses=' -w start"
    su postgres -s /bin/sh -c "$BIN/createdb -h /var/run/postgresql -p 5432 -U $POSTGRES_USER $POSTGRES_DB"
    su postgres -s /bin/sh -c "$BIN/pg_ctl -D $DATA -m fast -w stop"
fi
exec su postgres -s /bin/sh -c "exec $BIN/postgres -D $DATA"
