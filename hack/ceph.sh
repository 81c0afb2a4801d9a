#!/usr/bin/env bash
# A real single-node Ceph cluster on 127.0.0.1 (Debian's Ceph 16.2, cephx on), as verified in
# ../shared/DESIGN.md: one mon, one mgr, one bluestore OSD on a sparse file, pool `opensds`
# initialised for RBD, and a `client.opensds` key limited to that pool.
#
#   hack/ceph.sh up|down|status|reset
#
# State in .ceph/ (git-ignored): ceph.conf, admin keyring, client.opensds keyring, logs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${OPENSDS_CEPH_DIR:-$ROOT/.ceph}
PORT=${OPENSDS_CEPH_PORT:-13300}   # mon v2; v1 is PORT+1; daemons bind in PORT+100..PORT+199
POOL=opensds
CONF=$DIR/ceph.conf
ceph_() { ceph -c "$CONF" "$@"; }

status() { # healthy, and the pool's statistics published (what clients' `ceph df` reads)
  [[ -f $CONF ]] && timeout 10 ceph -c "$CONF" --connect-timeout 5 health 2>/dev/null | grep -q HEALTH_OK &&
    timeout 10 ceph -c "$CONF" --connect-timeout 5 df --format json 2>/dev/null | grep -q "\"name\":\"$POOL\""
}

stop() {
  for pidfile in "$DIR"/run/*.pid; do
    [[ -f $pidfile ]] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

write_conf() {
  local fsid=$1
  cat > "$CONF" <<CONF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$PORT,v1:127.0.0.1:$((PORT + 1))]
public addr = 127.0.0.1
ms bind ipv6 = false
ms bind port min = $((PORT + 100))
ms bind port max = $((PORT + 199))
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $DIR/admin.keyring
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
[mon]
mon data = $DIR/mon/\$id
paxos propose interval = 0.05
paxos min wait = 0.01
auth allow insecure global id reclaim = false
mon data avail warn = 5
[mgr]
mgr data = $DIR/mgr/\$id
keyring = $DIR/mgr/\$id/keyring
[osd]
osd data = $DIR/osd/\$id
keyring = $DIR/osd/\$id/keyring
osd objectstore = bluestore
bluestore block path = $DIR/osd-\$id-block.img
bluestore block create = true
bluestore block size = 10G
osd memory target = 939524096
CONF
}

up() {
  if status; then echo "ceph: running ($CONF)"; return; fi
  command -v ceph-mon >/dev/null || { echo "ceph: apt-get install ceph-mon ceph-mgr ceph-osd ceph-common" >&2; exit 1; }
  stop
  local start=$SECONDS
  if [[ ! -f $DIR/.created ]]; then
    rm -rf "$DIR"
    mkdir -p "$DIR"/{run,log,mon/a,mgr/x,osd}
    local fsid
    fsid=$(cat /proc/sys/kernel/random/uuid)
    write_conf "$fsid"
    ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$DIR/admin.keyring" --gen-key -n client.admin \
      --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/admin.keyring" >/dev/null
    monmaptool --create --addv a "[v2:127.0.0.1:$PORT,v1:127.0.0.1:$((PORT + 1))]" --fsid "$fsid" "$DIR/monmap" >/dev/null
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring"
  fi
  ceph-mon -c "$CONF" -i a 2>>"$DIR/log/daemons.err"
  if [[ ! -f $DIR/mgr/x/keyring ]]; then
    ceph_ auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' -o "$DIR/mgr/x/keyring"
  fi
  ceph-mgr -c "$CONF" -i x 2>>"$DIR/log/daemons.err"
  if [[ ! -f $DIR/.created ]]; then
    local uuid secret id
    uuid=$(cat /proc/sys/kernel/random/uuid)
    secret=$(ceph-authtool --gen-print-key)
    id=$(echo "{\"cephx_secret\": \"$secret\"}" | ceph_ osd new "$uuid" -i -)
    mkdir -p "$DIR/osd/$id"
    ceph-authtool --create-keyring "$DIR/osd/$id/keyring" --name "osd.$id" --add-key "$secret" >/dev/null
    ceph-osd -c "$CONF" -i "$id" --mkfs --osd-uuid "$uuid" >/dev/null 2>&1
    echo "$id" > "$DIR/osd.id"
  fi
  ceph-osd -c "$CONF" -i "$(cat "$DIR/osd.id")" 2>>"$DIR/log/daemons.err"
  if [[ ! -f $DIR/.created ]]; then
    ceph_ osd pool create "$POOL" 8 >/dev/null 2>&1
    rbd -c "$CONF" pool init "$POOL"
    ceph_ auth get-or-create client.opensds mon 'profile rbd' osd "profile rbd pool=$POOL" \
      mgr "profile rbd pool=$POOL" -o "$DIR/client.opensds.keyring"
    touch "$DIR/.created"
  fi
  # HEALTH_OK in ~6 s here, but minutes on a loaded host under the VM's emulated CPU: wait long
  # (OPENSDS_CEPH_HEALTH_TIMEOUT seconds); a healthy cluster returns at once.
  local deadline=$((SECONDS + ${OPENSDS_CEPH_HEALTH_TIMEOUT:-600}))
  until status; do
    ((SECONDS < deadline)) || { echo "ceph: not healthy; logs in $DIR/log" >&2; ceph_ health detail >&2 || true; exit 1; }
    sleep 0.5
  done
  echo "ceph: HEALTH_OK in $((SECONDS - start))s; conf $CONF, pool $POOL, key client.opensds"
}

case ${1:-} in
  up) up ;;
  down) stop; echo "ceph: down" ;;
  status) if status; then echo "ceph: HEALTH_OK"; else echo "ceph: not running"; exit 1; fi ;;
  reset) stop; rm -rf "$DIR"; echo "ceph: reset" ;;
  *) echo "usage: $0 up|down|status|reset" >&2; exit 2 ;;
esac
