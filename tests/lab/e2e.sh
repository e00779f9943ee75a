#!/bin/bash
# End-to-end: `controller cluster create` turns 5 hosts of a 6-host lab fleet (3 masters, 2
# workers) into a cluster, with the controller killed mid-rollout; `cluster add` joins the sixth
# as a worker later, `cluster remove --drain` takes it out again, and it is added back. Needs a kernel with IPVS: run inside the VM
# (tests/vm/run.sh tests/lab/e2e.sh OUT) or on a Debian host as root. Prints TAP-ish lines and
# "cluster-e2e: N passed, M failed"; exit code = failures.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export LAB_DIR=${LAB_DIR:-/tmp/fleetadm-e2e} LAB_HOSTS=6 LAB_BUNDLE=1
lab() { "$here/lab.sh" "$@"; }
ctl() { "$here/lab.sh" ctl "$@"; }
H() { echo "$LAB_DIR/hosts/$1"; }
fails=0; passes=0
ok() { echo "ok - $*"; passes=$((passes+1)); }
not_ok() { echo "not ok - $*"; fails=$((fails+1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else not_ok "$what"; fi; }
status_json() { ctl cluster status lab -o json 2>/dev/null; }
field() { sed -n "s/^  \"$1\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p"; }
t0=$(date +%s)
finish() {
  echo "# controller log tail:"; tail -n 15 "$LAB_DIR/controller.log" 2>/dev/null | sed 's/^/#   /'
  lab down >/dev/null 2>&1
  echo "cluster-e2e: $passes passed, $fails failed ($(( $(date +%s) - t0 ))s)"
  exit "$fails"
}
trap finish EXIT

modprobe ip_vs 2>/dev/null || true
lab up || { not_ok "lab fleet comes up"; exit; }
ok "lab fleet of 6 hosts enrolled and connected"

# --- the bundle: built from the kubeadm simulator, imported, bad ones refused
bdir=$LAB_DIR/bundles
mkdir -p "$bdir"
"$here/make-bundle.sh" "$bdir/k8s-lab.tar.gz" k8s-lab v1.29.9 amd64 >/dev/null 2>&1
check "bundle built" test -s "$bdir/k8s-lab.tar.gz"
out=$(ctl bundle import "$bdir/k8s-lab.tar.gz" 2>&1)
check "bundle imported, kubeadm and kubectl stored once" grep -q "9.9 MiB new\|new, the rest" <<<"$out"
"$here/make-bundle.sh" "$bdir/arm.tar.gz" k8s-arm v1.29.9 arm64 >/dev/null 2>&1
ctl bundle import "$bdir/arm.tar.gz" >/dev/null 2>&1
cp -r "$bdir/k8s-lab.d" "$bdir/liar"
echo "tampered" >> "$bdir/liar/bin/kubelet"
out=$(ctl bundle import "$bdir/liar" 2>&1); rc=$?
check "a bundle whose manifest lies is refused" test $rc -ne 0 -a -n "$(grep 'bin/kubelet: size' <<<"$out")"
head -c 100000 "$bdir/k8s-lab.tar.gz" > "$bdir/cut.tar.gz"
out=$(ctl bundle import "$bdir/cut.tar.gz" 2>&1); rc=$?
check "a truncated tarball is refused" test $rc -ne 0 -a -n "$(grep -i 'truncated\|corrupt' <<<"$out")"
check "only the good bundles are listed" test "$(ctl bundle list | grep -c '^k8s-')" -eq 2
out=$(ctl cluster create arm --masters h1 --bundle k8s-arm --dry-run 2>&1); rc=$?
check "an architecture mismatch is refused" test $rc -ne 0 -a -n "$(grep 'does not match bundle k8s-arm (arm64)' <<<"$out")"
check "hosts start without kubeadm" test ! -e "$(H h1)/usr-local-bin/kubeadm"

# --- planning and bad input
plan=$(ctl cluster create lab --masters h1,h2,h3 --nodes h4,h5 --dry-run 2>&1)
check "dry-run prints every phase" grep -q "join-workers" <<<"$plan"
check "dry-run joins masters with --control-plane" grep -q "kubeadm join --control-plane" <<<"$plan"
check "dry-run changes nothing" test -z "$(ctl cluster list -o json | grep '"name"')"
bad=$(ctl cluster create bad --masters h1,nosuch,10.9.9.9 2>&1); rc=$?
check "unknown hosts fail fast with exit code != 0" test $rc -ne 0
check "unknown hosts are listed together" grep -q "unknown hosts.*nosuch, 10.9.9.9" <<<"$bad"
check "a refused create records nothing" test -z "$(ctl cluster list -o json | grep '"name"')"

# --- create, kill the controller mid-rollout, restart it: the rollout resumes
ctl cluster create lab --masters h1,h2,h3 --nodes 10.78.0.14,h5 --bundle k8s-lab --max-parallel 1 --detach > "$LAB_DIR/create.out" 2>&1
check "create --detach returns at once" grep -q "cluster lab recorded" "$LAB_DIR/create.out"
ph=""
for _ in $(seq 600); do
  p=$(status_json | field phase)
  case "$p" in join-masters|join-workers|sync-ipvs|addons|record) ph=$p; break ;; esac
  sleep 0.2
done
echo "# killing the controller in phase $ph"
lab kill-controller
check "controller killed during the rollout (phase $ph)" test -n "$ph"
lab start-controller
check "state survived the kill" grep -q '"state": "running"\|"state": "succeeded"' <(status_json)
ctl cluster status lab --watch > "$LAB_DIR/watch.out" 2>&1; rc=$?
check "rollout finished successfully after the restart (status --watch exit 0)" test $rc -eq 0
grep -q "resuming rollout after restart" "$LAB_DIR/controller.log" && ok "controller resumed the rollout" || not_ok "controller resumed the rollout"
st=$(status_json)
check "cluster state succeeded" grep -q '"state": "succeeded"' <<<"$st"
check "no failed tasks" grep -q '"failed": 0' <<<"$st"
check "Ready condition" grep -A2 '"type": "Ready"' <<<"$st" | grep -q '"status": true'

# --- what the hosts look like
check "master0 runs kubeadm init once (attempt 1)" grep -q 'init/h1/kubeadm-init' <<<"$st"
check "h2 resolves apiserver.cluster.local to itself" grep -q "^10.78.0.12 apiserver.cluster.local" "$(H h2)/hosts"
check "h3 resolves apiserver.cluster.local to itself" grep -q "^10.78.0.13 apiserver.cluster.local" "$(H h3)/hosts"
check "workers resolve apiserver.cluster.local to the VIP" grep -q "^10.103.97.2 apiserver.cluster.local" "$(H h4)/hosts"
check "other /etc/hosts lines untouched" grep -q "^127.0.0.1	localhost" "$(H h4)/hosts"
check "master keys are 0600" test "$(stat -c %a "$(H h2)/etc-kubernetes/pki/ca.key" "$(H h3)/etc-kubernetes/pki/sa.key" | sort -u)" = 600
check "workers got no private keys" test -z "$(find "$(H h4)/etc-kubernetes" "$(H h5)/etc-kubernetes" -name '*.key')"
check "workers have the cluster CA from discovery" test -s "$(H h4)/etc-kubernetes/pki/ca.crt"
joined=$(cat "$(H h1)"/etc-kubernetes/sim/nodes "$(H h2)"/etc-kubernetes/sim/nodes "$(H h3)"/etc-kubernetes/sim/nodes 2>/dev/null)
joined=$(sort -u <<<"$joined")
check "masters h2, h3 joined the control plane" test "$(grep -c '^h[23] control-plane' <<<"$joined")" -eq 2
check "workers h4, h5 joined through the VIP" test "$(grep -c '^h[45] worker' <<<"$joined")" -eq 2
check "every cluster host has a kubelet.conf" test "$(ls "$LAB_DIR"/hosts/h*/etc-kubernetes/kubelet.conf | wc -l)" -eq 5
ipvs_h4=$(ip netns exec flab-h4 ipvsadm -Ln)
check "worker h4 has the IPVS VIP 10.103.97.2:6443" grep -q "TCP  10.103.97.2:6443 rr" <<<"$ipvs_h4"
check "worker h4 balances to all 3 masters" test "$(grep -c -- '-> 10.78.0.1[123]:6443' <<<"$ipvs_h4")" -eq 3
check "worker h5 has the same rules" test "$(ip netns exec flab-h5 ipvsadm -Ln | grep -c -- '-> 10.78.0.1[123]:6443')" -eq 3
check "local connections to the VIP leave from the worker's own address" grep -q "src 10.78.0.14" <(ip -n flab-h4 route get 10.103.97.2)
check "masters have no IPVS rules" test -z "$(ip netns exec flab-h1 ipvsadm -Ln | grep '^TCP')"

# --- the bundle on the hosts
check "bootstrap installed kubeadm on every cluster host" test "$(ls "$LAB_DIR"/hosts/h*/usr-local-bin/kubeadm | wc -l)" -eq 5
check "bootstrap installed the kubelet unit" test -s "$(H h4)/etc-systemd-system/kubelet.service.d/10-kubeadm.conf"
check "bootstrap persisted modules and sysctls" test -s "$(H h4)/etc-modules-load.d/fleetadm-kubernetes.conf" -a -s "$(H h4)/etc-sysctl.d/99-fleetadm-kubernetes.conf"
check "the bundle's post-bootstrap hook ran" grep -q "post-bootstrap hook for k8s-lab" <(ctl cluster logs lab --host h4)
check "addons from the bundle applied on master0" grep -q "DaemonSet/lab-cni" "$(H h1)/etc-kubernetes/sim/applied"
check "agents fetched the bundle over their session" grep -q "blobs fetched" <(ctl cluster logs lab --host h5)
again=$(lab on h5 "${FLEETADM_BIN_DIR:-$here/../../target/debug}/node-agent" bootstrap --bundle-dir "$bdir/k8s-lab.d" --state-dir "$(H h5)/state" 2>&1); rc=$?
check "bootstrap again on a host: succeeds" test $rc -eq 0
check "bootstrap again on a host: reports no changes" test -z "$(grep -v '^warning\|^skipped\|^no change' <<<"$again")"
out=$(ctl bundle remove k8s-lab 2>&1); rc=$?
check "a bundle in use cannot be removed" test $rc -ne 0 -a -n "$(grep 'used by cluster lab' <<<"$out")"
check "an unused bundle can be removed" ctl bundle remove k8s-arm

# --- CLI views
check "cluster list shows it" grep -q "^lab .*succeeded" <(ctl cluster list)
check "cluster logs show the worker join" grep -q "joined the cluster as worker" <(ctl cluster logs lab --host h4)
check "cluster logs refuse an unknown host" sh -c "! '$here/lab.sh' ctl cluster logs lab --host nosuch 2>/dev/null"
got=$(ctl cluster get lab)
check "cluster get exports a Clusterfile" grep -q "kind: Cluster" <<<"$got"
check "cluster get carries the status" grep -q "phase: succeeded" <<<"$got"
check "cluster kubeconfig is the admin kubeconfig" grep -q "server: https://apiserver.cluster.local:6443" <(ctl cluster kubeconfig lab)
again=$(ctl cluster create lab --masters h1,h2,h3 --nodes h4,h5 2>&1); rc=$?
check "creating it again is refused (already exists)" test $rc -ne 0 -a -n "$(grep 'already exists' <<<"$again")"

# --- day 2: a worker added to the running cluster; the other hosts are not touched
out=$(ctl cluster add lab --nodes h4 2>&1); rc=$?
check "adding a host of the cluster is refused" test $rc -ne 0 -a -n "$(grep 'already belong to this cluster: h4' <<<"$out")"
out=$(ctl cluster add lab --nodes h6,nosuch 2>&1); rc=$?
check "adding an unknown host is refused" test $rc -ne 0 -a -n "$(grep 'unknown hosts.*nosuch' <<<"$out")"
out=$(ctl cluster add nosuch --nodes h6 2>&1); rc=$?
check "adding to an unknown cluster is refused" test $rc -ne 0 -a -n "$(grep -i 'nosuch.*not found\|no cluster.*nosuch\|unknown cluster' <<<"$out")"
plan=$(ctl cluster add lab --nodes h6 --dry-run 2>&1); rc=$?
echo "$plan" | sed 's/^/#   /'
check "add --dry-run plans the join of h6" test $rc -eq 0 -a -n "$(grep 'h6' <<<"$plan" | grep 'kubeadm join')"
check "add --dry-run touches no other worker" test -z "$(grep -w 'h4\|h5' <<<"$plan")"
check "add --dry-run records nothing" grep -q '"operation": "create"' <(status_json)
h4_hosts=$(md5sum < "$(H h4)/hosts"); h4_kubelet=$(stat -c %Y "$(H h4)/etc-kubernetes/kubelet.conf")
out=$(ctl cluster add lab --nodes h6 2>&1); rc=$?
echo "$out" | tail -n 3 | sed 's/^/#   /'
check "cluster add joins h6 (exit 0)" test $rc -eq 0 -a -n "$(grep '1 of 1 new workers joined' <<<"$out")"
joined=$(sort -u "$(H h1)"/etc-kubernetes/sim/nodes "$(H h2)"/etc-kubernetes/sim/nodes "$(H h3)"/etc-kubernetes/sim/nodes 2>/dev/null)
check "h6 joined the cluster as a worker" grep -q '^h6 worker' <<<"$joined"
check "h6 has a kubelet.conf" test -s "$(H h6)/etc-kubernetes/kubelet.conf"
check "h6 was bootstrapped from the bundle" test -x "$(H h6)/usr-local-bin/kubeadm"
check "h6 resolves apiserver.cluster.local to the VIP" grep -q "^10.103.97.2 apiserver.cluster.local" "$(H h6)/hosts"
check "h6 balances to all 3 masters" test "$(ip netns exec flab-h6 ipvsadm -Ln | grep -c -- '-> 10.78.0.1[123]:6443')" -eq 3
check "h6 got no private keys" test -z "$(find "$(H h6)/etc-kubernetes" -name '*.key')"
check "h4's /etc/hosts not rewritten" test "$(md5sum < "$(H h4)/hosts")" = "$h4_hosts"
check "h4 not joined again" test "$(stat -c %Y "$(H h4)/etc-kubernetes/kubelet.conf")" = "$h4_kubelet"
check "cluster status names the operation" grep -q '"operation": "add workers h6"' <(status_json)
tok() { sed -n 's/^ *token: *"\{0,1\}\([a-z0-9]\{6\}\.[a-z0-9]\{16\}\)"\{0,1\}$/\1/p' "$(H "$1")/etc-kubernetes/fleetadm/kubeadm-join.yaml" | head -n 1; }
t4=$(tok h4); t6=$(tok h6)
check "h6 joined with a token of its own (not the create's)" test -n "$t4" -a -n "$t6" -a "$t4" != "$t6"
check "the add's token is deleted once it is done" test -n "$t6" -a -e "$(H h1)/etc-kubernetes/sim/tokens" -a -z "$(grep -F "${t6:-none}" "$(H h1)/etc-kubernetes/sim/tokens")"
check "cluster list still shows it succeeded" grep -q "^lab .*succeeded" <(ctl cluster list)

# --- day 2: a worker removed (drained, reset, its Node object deleted), then added back
out=$(ctl cluster remove lab --nodes h1 2>&1); rc=$?
check "a master named with --nodes is refused (masters go with --masters)" test $rc -ne 0 -a -n "$(grep 'h1 is a master of cluster lab: name masters with --masters' <<<"$out")"
out=$(ctl cluster remove lab --nodes nosuch 2>&1); rc=$?
check "removing a host outside the cluster is refused" test $rc -ne 0 -a -n "$(grep 'not workers of cluster lab: nosuch' <<<"$out")"
plan=$(ctl cluster remove lab --nodes 10.78.0.16 --drain --dry-run 2>&1); rc=$?
echo "$plan" | sed 's/^/#   /'
check "remove --dry-run drains, resets and deletes h6 only" test $rc -eq 0 -a -n "$(grep 'kubectl drain h6' <<<"$plan")" -a -n "$(grep 'h6 .*kubeadm-reset' <<<"$plan")" -a -n "$(grep 'kubectl delete node h6' <<<"$plan")" -a -z "$(grep -w 'h4\|h5' <<<"$plan")"
check "remove --dry-run changes nothing" grep -q '"operation": "add workers h6"' <(status_json)
h4_hosts=$(md5sum < "$(H h4)/hosts"); h4_kubelet=$(stat -c %Y "$(H h4)/etc-kubernetes/kubelet.conf")
out=$(ctl cluster remove lab --nodes h6 --drain 2>&1); rc=$?
echo "$out" | tail -n 2 | sed 's/^/#   /'
check "cluster remove takes h6 out (exit 0)" test $rc -eq 0 -a -n "$(grep 'workers h6 removed' <<<"$out")"
check "h6 was drained first" grep -q "node h6 drained" <(ctl cluster logs lab --host h1)
check "h6's Node object is gone from every member" test -z "$(grep -l '^h6 ' "$(H h1)"/etc-kubernetes/sim/nodes "$(H h2)"/etc-kubernetes/sim/nodes "$(H h3)"/etc-kubernetes/sim/nodes)"
check "the other workers' Node objects stay" test "$(grep -c '^h[45] worker' "$(H h1)/etc-kubernetes/sim/nodes")" -eq 2
check "h6 was reset (no kubelet.conf)" test ! -e "$(H h6)/etc-kubernetes/kubelet.conf"
check "h6's IPVS service removed" test -z "$(ip netns exec flab-h6 ipvsadm -Ln | grep '^TCP')"
check "h6's /etc/hosts block and bootstrap undone" test -z "$(grep 'fleetadm managed block' "$(H h6)/hosts")" -a ! -e "$(H h6)/usr-local-bin/kubeadm"
check "h4 untouched by the removal" test "$(md5sum < "$(H h4)/hosts")" = "$h4_hosts" -a "$(stat -c %Y "$(H h4)/etc-kubernetes/kubelet.conf")" = "$h4_kubelet"
check "h4 still balances to all 3 masters" test "$(ip netns exec flab-h4 ipvsadm -Ln | grep -c -- '-> 10.78.0.1[123]:6443')" -eq 3
got=$(ctl cluster get lab 2>&1)
check "the cluster no longer lists h6" test -n "$(grep 'kind: Cluster' <<<"$got")" -a -n "$(grep '10.78.0.14' <<<"$got")" -a -z "$(grep '10.78.0.16' <<<"$got")"
# --- a master joins and leaves: etcd membership, every worker's IPVS, every /etc/hosts and the
#     apiserver certificate follow
# (from h5: never from the netns of the client through the VIP, whose IPVS-translated
#  connections could pick the same source port as a direct one to the same master)
served() { ip netns exec flab-h5 sh -c "openssl s_client -connect $1:6443 </dev/null 2>/dev/null | openssl x509 -noout $2"; }
peers() { grep -c . "$(H "$1")/etc-kubernetes/sim/peers"; }
out=$(ctl cluster add lab --masters h6 --dry-run 2>&1); rc=$?
check "add --masters --dry-run: the existing masters' apiserver certificate first, then the join" test $rc -eq 0 -a "$(grep -Ec ' h[123] +certs-install' <<<"$out")" -eq 3 -a -n "$(grep -E ' h6 +kubeadm-join +kubeadm join --control-plane' <<<"$out")"
out=$(ctl cluster add lab --masters h6 2>&1); rc=$?
sed 's/^/#   /' <<<"$out" | tail -2
check "h6 added as a master (exit 0)" test $rc -eq 0 -a -n "$(grep 'add masters h6 done' <<<"$out")"
check "etcd grew to 4 members (on h1 and h2)" test "$(peers h1)" -eq 4 -a "$(peers h2)" -eq 4 -a -n "$(grep -x '10.78.0.16:6443' "$(H h3)/etc-kubernetes/sim/peers")"
check "h6 is a control-plane node" grep -q '^h6 control-plane' "$(H h1)/etc-kubernetes/sim/nodes"
check "h6's apiserver serves" test -n "$(served 10.78.0.16 -serial)"
check "h1's apiserver certificate was reissued for h6" test -n "$(served 10.78.0.11 '-ext subjectAltName' | grep '10.78.0.16' | grep 'DNS:h6')"
check "h6 resolves apiserver.cluster.local to itself" grep -q "^10.78.0.16 apiserver.cluster.local" "$(H h6)/hosts"
for w in h4 h5; do
  check "worker $w balances to 4 masters now" test "$(ip netns exec flab-$w ipvsadm -Ln | grep -c -- '-> 10.78.0.1[1236]:6443')" -eq 4
  check "worker $w's /etc/hosts lists h6" grep -q "^10.78.0.16 h6" "$(H $w)/hosts"
done
check "h2's /etc/hosts lists h6" grep -q "^10.78.0.16 h6" "$(H h2)/hosts"
out=$(ctl cluster remove lab --masters h1,h2,h3,h6 2>&1); rc=$?
check "removing every master is refused" test $rc -ne 0 -a -n "$(grep 'no master left' <<<"$out")"
out=$(ctl cluster remove lab --masters h4 2>&1); rc=$?
check "a worker named as a master is refused" test $rc -ne 0 -a -n "$(grep 'h4 is a worker' <<<"$out")"
out=$(ctl cluster remove lab --masters h6 2>&1); rc=$?
sed 's/^/#   /' <<<"$out" | tail -2
check "h6 removed as a master (exit 0)" test $rc -eq 0 -a -n "$(grep 'remove masters h6 done' <<<"$out")"
check "etcd shrank to 3 members (h6 left before its reset)" test "$(peers h1)" -eq 3 -a "$(peers h3)" -eq 3 -a -z "$(grep '10.78.0.16' "$(H h2)/etc-kubernetes/sim/peers")"
check "h6's Node object is gone" test -z "$(grep '^h6 ' "$(H h1)/etc-kubernetes/sim/nodes")"
check "h6 was reset (no manifests, no kubelet.conf)" test ! -e "$(H h6)/etc-kubernetes/manifests/kube-apiserver.yaml" -a ! -e "$(H h6)/etc-kubernetes/kubelet.conf"
for w in h4 h5; do
  check "worker $w balances to the 3 masters left" test "$(ip netns exec flab-$w ipvsadm -Ln | grep -c -- '-> 10.78.0.1[123]:6443')" -eq 3 -a -z "$(ip netns exec flab-$w ipvsadm -Ln | grep '10.78.0.16')"
  check "worker $w's /etc/hosts no longer lists h6" test -z "$(grep ' h6$' "$(H $w)/hosts")"
done
out=$(ctl cluster add lab --nodes h6 2>&1); rc=$?
check "h6 added back after its removal (exit 0)" test $rc -eq 0 -a -n "$(grep '1 of 1 new workers joined' <<<"$out")"
check "h6 joined again" grep -q '^h6 worker' "$(H h1)/etc-kubernetes/sim/nodes"
check "h6 balances to all 3 masters again" test "$(ip netns exec flab-h6 ipvsadm -Ln | grep -c -- '-> 10.78.0.1[123]:6443')" -eq 3

# --- certificates: every host's expiry; a SAN added (apiservers restarted one at a time, measured
#     through the VIP); everything renewed with the configured validity
certs=$(ctl cluster certs lab 2>&1); rc=$?
sed 's/^/#   /' <<<"$certs" | head -8
check "cluster certs answered for every host (exit 0)" test $rc -eq 0
check "... the apiserver certificate on each master, ~100 years left" test "$(awk '$2=="apiserver" && $4 ~ /^(99|100)y$/' <<<"$certs" | wc -l)" -eq 3
check "... super-admin.conf on master0 only (kubeadm 1.29 layout)" test "$(awk '$2=="super-admin.conf"{print $1}' <<<"$certs" | tr '\n' ' ')" = "h1 "
check "... each host's kubelet.conf client certificate (a year)" test "$(awk '$2=="kubelet.conf" && $4 ~ /^(364|365)d$/' <<<"$certs" | wc -l)" -eq 6
check "... the cluster CA on every host" test "$(awk '$2=="ca" && $NF=="yes"' <<<"$certs" | wc -l)" -eq 6
check "... nothing unreadable, nothing expiring" test -z "$(grep -i 'error\|expires soon\|warning' <<<"$certs")"
subject_of() { grep "$2:" "$1" | awk '{print $2}' | base64 -d | openssl x509 -noout -subject; }
check "admin.conf is in kubeadm:cluster-admins (revocable by RBAC)" grep -q 'O *= *kubeadm:cluster-admins' <(subject_of "$(H h2)/etc-kubernetes/admin.conf" client-certificate-data)
check "super-admin.conf is in system:masters" grep -q 'O *= *system:masters' <(subject_of "$(H h1)/etc-kubernetes/super-admin.conf" client-certificate-data)
serial_h2=$(served 10.78.0.12 -serial)
ca_md5=$(md5sum < "$(H h3)/etc-kubernetes/pki/ca.crt"); h4_ca=$(md5sum < "$(H h4)/etc-kubernetes/pki/ca.crt")
out=$(ctl cluster certs lab --add-san 'api.lab.example,192.0.2.50' --dry-run 2>&1); rc=$?
check "--add-san --dry-run plans one certs-install per master" test $rc -eq 0 -a "$(grep -c 'certs-install' <<<"$out")" -eq 3
out=$(ctl cluster certs lab --add-san 'bad name' 2>&1); rc=$?
check "a SAN that is no name is refused, saying why" test $rc -ne 0 -a -n "$(grep 'neither an IP address nor a DNS name' <<<"$out")"
lab on h4 /usr/local/bin/kubeadm __vip-client 10.103.97.2:6443 /etc/kubernetes/pki/ca.crt 45 > "$LAB_DIR/vip-certs.out" 2>&1 &
cpid=$!
sleep 1
out=$(ctl cluster certs lab --add-san 'api.lab.example,192.0.2.50' 2>&1); rc=$?
sed 's/^/#   /' <<<"$out" | tail -3
check "--add-san finished (exit 0)" test $rc -eq 0 -a -n "$(grep 'add SANs api.lab.example,192.0.2.50' <<<"$out")"
for ip in 10.78.0.11 10.78.0.12 10.78.0.13; do
  check "the apiserver on $ip now serves the new SANs" test -n "$(served $ip '-ext subjectAltName' | grep 'api.lab.example' | grep '192.0.2.50')"
done
check "h2's apiserver serves a new certificate" test -n "$serial_h2" -a "$(served 10.78.0.12 -serial)" != "$serial_h2"
logs=$(ctl cluster logs lab 2>&1)
check "each master's apiserver was restarted after its new certificate" test "$(grep -c 'kube-apiserver: stopped after' <<<"$logs")" -eq 3
wait $cpid
sed 's/^/#   /' "$LAB_DIR/vip-certs.out"
reqs=$(sed -n 's/^requests=\([0-9]*\) failed=.*/\1/p' "$LAB_DIR/vip-certs.out")
failed=$(sed -n 's/^requests=[0-9]* failed=\([0-9]*\)$/\1/p' "$LAB_DIR/vip-certs.out")
echo "# rolling apiserver restarts (add-san) through the VIP: ${reqs:-?} requests, ${failed:-?} failed"
check "the client kept making requests through the VIP (${reqs:-none} in 45s)" test "${reqs:-0}" -ge 100
check "no client request failed while the apiservers restarted one by one (${failed:-?} failed)" test "${failed:-x}" = 0
check "workers untouched by the certificate change" test "$(md5sum < "$(H h4)/etc-kubernetes/pki/ca.crt")" = "$h4_ca"
end_before=$(openssl x509 -noout -enddate -in "$(H h3)/etc-kubernetes/pki/etcd/server.crt")
admin_before=$(md5sum < "$(H h2)/etc-kubernetes/admin.conf")
out=$(ctl cluster certs lab --renew all 2>&1); rc=$?
sed 's/^/#   /' <<<"$out" | tail -2
check "--renew all finished (exit 0)" test $rc -eq 0
end_after=$(openssl x509 -noout -enddate -in "$(H h3)/etc-kubernetes/pki/etcd/server.crt")
check "h3's etcd server certificate renewed ($end_after)" test "$end_after" != "$end_before"
year=$(sed 's/.* \([0-9]\{4\}\) GMT/\1/' <<<"$end_after")
check "... with the configured validity, not a year (expires $year)" test "${year:-0}" -ge $(( $(date +%Y) + 99 ))
check "h2's admin.conf renewed" test "$(md5sum < "$(H h2)/etc-kubernetes/admin.conf")" != "$admin_before"
check "the cluster CA is kept" test "$(md5sum < "$(H h3)/etc-kubernetes/pki/ca.crt")" = "$ca_md5"
check "the renewed apiserver certificate keeps the added SAN" test -n "$(served 10.78.0.13 '-ext subjectAltName' | grep 'api.lab.example')"
logs=$(ctl cluster logs lab 2>&1)
check "every static pod restarted on every master (12 restarts)" test "$(grep -Ec '(etcd|kube-apiserver|kube-controller-manager|kube-scheduler): stopped after' <<<"$logs")" -eq 12

# --- an etcd backup through master0's agent, with the etcdctl the bundle installed
out=$(ctl cluster backup lab 2>&1); rc=$?
echo "#   $out"
check "cluster backup took a snapshot on h1 (exit 0)" test $rc -eq 0 -a -n "$(grep 'taken on h1' <<<"$out")"
sha=$(sed -n 's/.*(sha256 \([0-9a-f]\{64\}\)).*/\1/p' <<<"$out")
snap="$LAB_DIR/controller/backups/sha256/${sha:0:2}/$sha"
check "the controller holds it, intact (sha256 matches)" test -n "$sha" -a "$(sha256sum < "$snap" 2>/dev/null | cut -d' ' -f1)" = "$sha"
check "it holds the cluster's Node objects" test -n "$(grep '^h4 worker' "$snap" 2>/dev/null)" -a -n "$(grep '^h1 control-plane' "$snap" 2>/dev/null)"
check "cluster backups lists it" test -n "$(ctl cluster backups lab | grep "^etcd-.* h1 ")"

# --- damage and restore: h5's Node object deleted, etcd restored on every master from that backup
bid=$(ctl cluster backups lab -o json | sed -n 's/.*"id": "\(etcd-[0-9]*\)".*/\1/p' | tail -1)
lab on h1 kubectl --kubeconfig /etc/kubernetes/admin.conf delete node h5 >/dev/null 2>&1
check "damage: h5's Node object is gone from every master" test -z "$(grep -l '^h5 ' "$(H h1)"/etc-kubernetes/sim/nodes "$(H h2)"/etc-kubernetes/sim/nodes "$(H h3)"/etc-kubernetes/sim/nodes)"
out=$(ctl cluster restore lab --snapshot "$bid" 2>&1); rc=$?
sed 's/^/#   /' <<<"$out" | tail -2
check "cluster restore from $bid finished (exit 0)" test -n "$bid" -a $rc -eq 0 -a -n "$(grep "restore etcd from $bid on 3 masters" <<<"$out")"
check "h5's Node object is back on every master" test "$(grep -l '^h5 worker' "$(H h1)"/etc-kubernetes/sim/nodes "$(H h2)"/etc-kubernetes/sim/nodes "$(H h3)"/etc-kubernetes/sim/nodes | wc -l)" -eq 3
check "each master kept its old etcd data beside the restored one" test "$(ls -d "$(H h1)"/var-lib-etcd/.member.before-restore-* "$(H h2)"/var-lib-etcd/.member.before-restore-* "$(H h3)"/var-lib-etcd/.member.before-restore-* 2>/dev/null | wc -l)" -eq 3
back=no
for _ in $(seq 100); do
  [ "$(ip netns exec flab-h4 ipvsadm -Ln | grep -c -- '-> 10.78.0.1[123]:6443 *Masq *1')" -eq 3 ] && { back=yes; break; }
  sleep 0.2
done
check "after the restore every master is back in h4's rotation" test $back = yes

# --- day 2: Kubernetes upgraded one minor version (v1.29.9 -> v1.30.5) from a new bundle: the masters
#     one at a time (kubeadm upgrade apply on h1), a canary worker, a pause (held across a controller
#     restart) until `op resume`, the other workers one at a time, the controller killed during the
#     worker waves; clients through the VIP keep working; certificates keep their validity
"$here/make-bundle.sh" "$bdir/k8s-lab-130.tar.gz" k8s-lab-130 v1.30.5 amd64 >/dev/null 2>&1
ctl bundle import "$bdir/k8s-lab-130.tar.gz" >/dev/null 2>&1
check "the v1.30.5 bundle is imported" test -n "$(ctl bundle list | grep '^k8s-lab-130 ')"
api_expiry() { ctl cluster certs lab 2>/dev/null | awk -v h="$1" '$1==h && $2=="apiserver"{print $3}'; }
exp_before=$(api_expiry h1)
out=$(ctl cluster upgrade lab --version v1.31.0 2>&1); rc=$?
check "an upgrade that skips a minor version is refused" test $rc -ne 0 -a -n "$(grep 'skips a minor version' <<<"$out")"
out=$(ctl cluster upgrade lab --version v1.28.15 2>&1); rc=$?
check "a downgrade is refused" test $rc -ne 0 -a -n "$(grep 'downgrades are not supported' <<<"$out")"
out=$(ctl cluster upgrade lab --version v1.30.4 --bundle k8s-lab-130 2>&1); rc=$?
check "a bundle of another version is refused" test $rc -ne 0 -a -n "$(grep 'carries Kubernetes v1.30.5' <<<"$out")"
plan=$(ctl cluster upgrade lab --version v1.30.5 --bundle k8s-lab-130 --max-parallel 1 --canary 1 --dry-run 2>&1); rc=$?
sed -n '/upgrade-masters/,/upgrade-workers/p' <<<"$plan" | head -8 | sed 's/^/#   /'
check "upgrade --dry-run: kubeadm upgrade apply on h1 first, upgrade node on h2 and h3" test $rc -eq 0 -a -n "$(grep -E ' h1 +kubeadm-upgrade .*upgrade apply v1.30.5 --certificate-renewal=false' <<<"$plan")" -a "$(grep -Ec ' h[23] +kubeadm-upgrade .*upgrade node' <<<"$plan")" -eq 2
check "... every worker drained, its kubelet restarted, uncordoned" test "$(grep -Ec ' h[456] +kubelet-restart' <<<"$plan")" -eq 3 -a "$(grep -Ec 'kubectl uncordon h[456]' <<<"$plan")" -eq 3 -a "$(grep -Ec 'kubectl drain h[456]' <<<"$plan")" -eq 3
check "... the first worker as a canary, then a pause" test -n "$(grep 'canary: the first 1 worker(s), then a pause until .controller op resume cluster/lab.' <<<"$plan")"
check "... and changes nothing" test "$(status_json | field version)" = v1.29.9
lab on h6 /usr/local/bin/kubeadm __vip-client 10.103.97.2:6443 /etc/kubernetes/pki/ca.crt 40 > "$LAB_DIR/vip-upgrade.out" 2>&1 &
upc=$!
resumed_before=$(grep -c "resuming rollout after restart" "$LAB_DIR/controller.log")
ctl cluster upgrade lab --version v1.30.5 --bundle k8s-lab-130 --max-parallel 1 --canary 1 --detach > "$LAB_DIR/upgrade.out" 2>&1
check "upgrade --detach recorded the operation" grep -q "upgrade v1.29.9 -> v1.30.5 recorded" "$LAB_DIR/upgrade.out"
paused=no; ops=""
for _ in $(seq 1500); do
  ops=$(ctl op list -o json 2>/dev/null)
  grep -q '"state": "paused"' <<<"$ops" && { paused=yes; break; }
  sleep 0.2
done
check "the upgrade paused after its canary worker h4" test $paused = yes -a -n "$(grep 'the canary (h4) passed' <<<"$ops")"
nodes=$(lab on h2 kubectl --kubeconfig /etc/kubernetes/admin.conf get nodes 2>&1)
opst=$(ctl op status cluster/lab 2>&1)
sed -n '1,3p' <<<"$opst" | sed 's/^/#   /'
check "... op status: paused by the canary, h1-h4 through, h5 and h6 pending" test -n "$(grep '^state: paused: the canary (h4) passed' <<<"$opst")" -a "$(grep -cE '^h[1-4] +succeeded' <<<"$opst")" -eq 4 -a "$(grep -cE '^h[56] +pending' <<<"$opst")" -eq 2
check "... h4's kubelet at v1.30.5, h5's and h6's still at v1.29.9" test "$(grep -cE '^h4 +Ready +[^ ]+ +v1\.30\.5$' <<<"$nodes")" -eq 1 -a "$(grep -cE '^h[56] +Ready +[^ ]+ +v1\.29\.9$' <<<"$nodes")" -eq 2
lab kill-controller
lab start-controller
up=no
for _ in $(seq 300); do
  [ "$(ctl nodes list -o json 2>/dev/null | grep -c '"connected": true')" -eq 6 ] && { up=yes; break; }
  sleep 0.2
done
sleep 3
check "after a controller restart (all 6 agents back, 3s more) it is still paused and h5 untouched" test $up = yes -a -n "$(ctl op list -o json | grep '"state": "paused"')" -a -n "$(grep 'KUBEADM_SIM_VERSION=v1.29.9' "$(H h5)/usr-local-bin/kubeadm")"
ctl op resume cluster/lab > /dev/null 2>&1
ph=""
for _ in $(seq 1500); do
  grep -q 'KUBEADM_SIM_VERSION=v1.30.5' "$(H h5)/usr-local-bin/kubeadm" 2>/dev/null && [ "$(status_json | field phase)" = upgrade-workers ] && { ph=upgrade-workers; break; }
  sleep 0.2
done
echo "# killing the controller in phase ${ph:-(not reached)} (h5 bootstrapped, its upgrade under way)"
lab kill-controller
check "controller killed during the worker waves, after the canary was resumed" test "$ph" = upgrade-workers
sleep 1
lab start-controller
ctl cluster status lab --watch > "$LAB_DIR/watch-upgrade.out" 2>&1; rc=$?
tail -n 3 "$LAB_DIR/watch-upgrade.out" | sed 's/^/#   /'
check "the upgrade finished after the restart (status --watch exit 0)" test $rc -eq 0
check "... resumed by the restarted controller (twice)" test "$(grep -c "resuming rollout after restart" "$LAB_DIR/controller.log")" -ge $((resumed_before + 2))
st=$(status_json)
check "the cluster is at v1.30.5 and succeeded" test "$(field version <<<"$st")" = v1.30.5 -a "$(field state <<<"$st")" = succeeded
opst=$(ctl op status cluster/lab 2>&1)
check "op status cluster/lab: succeeded, all 6 hosts through" test -n "$(grep '^state: succeeded' <<<"$opst")" -a "$(grep -cE '^h[1-6] +succeeded' <<<"$opst")" -eq 6
nodes=$(lab on h2 kubectl --kubeconfig /etc/kubernetes/admin.conf get nodes 2>&1)
sed 's/^/#   /' <<<"$nodes"
check "every node's kubelet reports v1.30.5, all schedulable again" test "$(grep -cE '^h[1-6] +Ready +[^ ]+ +v1\.30\.5$' <<<"$nodes")" -eq 6
check "every master's control plane runs v1.30.5 images" test "$(grep -l 'image: registry.k8s.io/kube-apiserver:v1.30.5' "$(H h1)" "$(H h2)" "$(H h3)" -r --include=kube-apiserver.yaml 2>/dev/null | wc -l)" -eq 3
check "every master's etcd holds the new cluster version (kubeadm-config)" test "$(cat "$(H h1)/etc-kubernetes/sim/version" "$(H h2)/etc-kubernetes/sim/version" "$(H h3)/etc-kubernetes/sim/version" | grep -cx v1.30.5)" -eq 3
out=$(ctl exec --cluster lab -- kubeadm version -o short 2>&1)
check "kubeadm v1.30.5 on every host (from the bundle)" test "$(grep -cE '^h[1-6] \| v1\.30\.5$' <<<"$out")" -eq 6
exp_after=$(api_expiry h1)
check "certificates were not renewed by kubeadm (h1's apiserver expiry unchanged: $exp_after)" test -n "$exp_before" -a "$exp_before" = "$exp_after"
wait $upc
sed 's/^/#   /' "$LAB_DIR/vip-upgrade.out"
reqs=$(sed -n 's/^requests=\([0-9]*\) failed=.*/\1/p' "$LAB_DIR/vip-upgrade.out")
failed=$(sed -n 's/^requests=[0-9]* failed=\([0-9]*\)$/\1/p' "$LAB_DIR/vip-upgrade.out")
echo "# control-plane upgrade through the VIP: ${reqs:-?} requests, ${failed:-?} failed"
check "clients through the VIP kept working during the control-plane upgrade (${reqs:-?} requests, ${failed:-?} failed)" test "${reqs:-0}" -ge 100 -a "${failed:-x}" = 0
out=$(ctl cluster upgrade lab --version v1.30.5 --bundle k8s-lab-130 2>&1); rc=$?
check "upgrading to the version it runs is refused" test $rc -ne 0 -a -n "$(grep 'at v1.30.5 already' <<<"$out")"
check "the old bundle is free once no cluster uses it" ctl bundle remove k8s-lab

# --- exec on a role, and the audit log of the day-2 operations
out=$(ctl exec --cluster lab --role node -- hostname 2>/dev/null); rc=$?
check "exec --role node ran on every worker, output prefixed by host" test $rc -eq 0 -a -n "$(grep -x 'h4 | h4' <<<"$out")" -a -n "$(grep -x 'h5 | h5' <<<"$out")" -a -n "$(grep -x 'h6 | h6' <<<"$out")"
check "... and on no master" test -z "$(grep '^h[123] ' <<<"$out")"
out=$(ctl exec --cluster lab --role master -- sh -c 'test "$(hostname)" != h2' 2>&1); rc=$?
check "exec fails (exit != 0) when one master fails, naming it" test $rc -ne 0 -a -n "$(grep 'h2' <<<"$out")"
ev=$(ctl events --cluster lab --limit 10000 -o json 2>&1)
for a in cluster.add cluster.remove cluster.certs cluster.backup cluster.restore cluster.upgrade exec; do
  check "the audit log has $a by uid:0" test -n "$(grep -B1 "\"action\": \"$a\"" <<<"$ev" | grep '"actor": "uid:0"')"
done

# --- an apiserver restart, measured through the VIP: on SIGTERM it fails /readyz and keeps serving
#     for --shutdown-delay-duration; the workers' guards (probing /readyz) take it out of rotation
#     first, so no client request through the VIP fails
lab on h4 /usr/local/bin/kubeadm __vip-client 10.103.97.2:6443 /etc/kubernetes/pki/ca.crt 14 > "$LAB_DIR/vip-client.out" 2>&1 &
cpid=$!
sleep 2
lab on h2 /usr/local/bin/kubeadm __restart-apiserver > "$LAB_DIR/restart.out" 2>&1 &
rpid=$!
drained=no
for _ in $(seq 200); do
  if ip netns exec flab-h4 ipvsadm -Ln | grep -q -- '-> 10.78.0.12:6443 *Masq *0'; then drained=yes; break; fi
  sleep 0.02
done
wait $rpid; rrc=$?
wait $cpid
sed 's/^/#   /' "$LAB_DIR/restart.out" "$LAB_DIR/vip-client.out"
check "h2's apiserver restarted gracefully (stopped after its shutdown delay, started again)" test $rrc -eq 0 -a -n "$(grep 'stopped after [5-9]' "$LAB_DIR/restart.out")"
check "the guard took h2 out of rotation while it still served (weight 0)" test $drained = yes
reqs=$(sed -n 's/^requests=\([0-9]*\) failed=.*/\1/p' "$LAB_DIR/vip-client.out")
failed=$(sed -n 's/^requests=[0-9]* failed=\([0-9]*\)$/\1/p' "$LAB_DIR/vip-client.out")
echo "# apiserver restart through the VIP: ${reqs:-?} requests, ${failed:-?} failed"
check "the client kept making requests through the VIP (${reqs:-none} in 14s)" test "${reqs:-0}" -ge 10
check "no client request failed during the apiserver restart (${failed:-?} failed)" test "${failed:-x}" = 0
back=no
for _ in $(seq 100); do
  if ip netns exec flab-h4 ipvsadm -Ln | grep -q -- '-> 10.78.0.12:6443 *Masq *1'; then back=yes; break; fi
  sleep 0.1
done
check "h2 back in rotation after the restart" test $back = yes

# --- the agent's guard keeps the worker's rules healthy
# (its kubelet stopped first: a kubelet would start the apiserver again)
kill -9 "$(cat "$(H h1)/etc-kubernetes/sim/kubelet.pid")"
kill "$(cat "$(H h1)/etc-kubernetes/sim/apiserver.pid")"
gone=no
for _ in $(seq 150); do
  if ! ip netns exec flab-h4 ipvsadm -Ln | grep -q -- '-> 10.78.0.11:6443 *Masq *1'; then gone=yes; break; fi
  sleep 0.2
done
check "a dead master leaves the workers' rotation" test $gone = yes
lbview=""; seen=no
for _ in $(seq 50); do
  lbview=$(ctl nodes show h4 -o json)
  grep -A3 '"address": "10.78.0.11:6443"' <<<"$lbview" | grep -q '"healthy": false' && { seen=yes; break; }
  sleep 0.2
done
check "the controller sees the worker's guard report the dead master" test $seen = yes
check "... as unhealthy, the others healthy" test "$(grep -c '"healthy": true' <<<"$lbview")" -eq 2
check "the other masters stay" test "$(ip netns exec flab-h4 ipvsadm -Ln | grep -c -- '-> 10.78.0.1[23]:6443 *Masq *1')" -eq 2
# The rules are sampled from before the agent stops until its successor's guard has published its
# own status and run a few more probe rounds: every sample must show the same real servers.
rules() { ip netns exec flab-h5 ipvsadm -Ln | grep -c -- '-> 10.78.0.1[23]:6443'; }
before=$(rules); samples="$before"
lab stop-agent h5
samples="$samples $(rules)"
touch "$LAB_DIR/agent-restart.mark"
lab start-agent h5
took_over=no
for _ in $(seq 100); do
  samples="$samples $(rules)"
  if [ "$(H h5)/state/lb-status.json" -nt "$LAB_DIR/agent-restart.mark" ]; then took_over=yes; break; fi
  sleep 0.1
done
for _ in $(seq 20); do samples="$samples $(rules)"; sleep 0.1; done
check "the restarted agent's guard took over (published its status)" test $took_over = yes
check "an agent restart keeps the rules (no flap; $(wc -w <<<"$samples") samples)" test -z "$(tr ' ' '\n' <<<"$samples" | grep -vx "$before")" -a "$before" -eq 2

# --- delete: every host reset, the bundle's files gone, the cluster forgotten, the bundle free
out=$(ctl cluster delete lab 2>&1); rc=$?
check "cluster delete succeeds" test $rc -eq 0 -a -n "$(grep 'cluster lab deleted' <<<"$out")"
check "workers' IPVS service removed" test -z "$(ip netns exec flab-h4 ipvsadm -Ln | grep '^TCP')"
check "the added worker was reset too" test -z "$(ip netns exec flab-h6 ipvsadm -Ln | grep '^TCP')" -a ! -e "$(H h6)/etc-kubernetes/kubelet.conf"
check "bootstrap undone (kubeadm removed from every host)" test -z "$(ls "$LAB_DIR"/hosts/h*/usr-local-bin/kubeadm 2>/dev/null)"
check "kubeadm reset ran on the masters" test ! -e "$(H h2)/etc-kubernetes/manifests/kube-apiserver.yaml"
check "managed /etc/hosts blocks removed" test -z "$(grep -l 'fleetadm managed block' "$LAB_DIR"/hosts/h*/hosts)"
check "the cluster is forgotten" test -z "$(ctl cluster list -o json | grep '"lab"')"
check "the bundle can be removed now" ctl bundle remove k8s-lab-130
