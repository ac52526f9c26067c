#!/usr/bin/env bash
# Build the real kube-apiserver that the cluster tests start on loopback (tests/launcher/kube_apiserver.py),
# for anyone without a copy in ../shared/tools/kube-apiserver/.
#
#   sudo scripts/build-kube-apiserver.sh [OUT_DIR]      # default OUT_DIR: build/kube-apiserver
#   export USERLOOP_KUBE_APISERVER=$PWD/build/kube-apiserver/kube-apiserver
#
# What it builds: kube-apiserver v1.20.2 from Debian bookworm's `kubernetes` source package (the full tree
# with vendor/), with Debian's Go (1.19). It is the newest Kubernetes whose source the Debian archive
# carries; the tests know its limits (no fieldValidation=Strict, no CEL, no native sidecars: see the
# module docstring of tests/launcher/kube_apiserver.py). etcd comes from Debian too (etcd-server 3.4).
# Needs Debian bookworm, root (apt-get) and deb.debian.org; about 10 minutes on 2 cores. /etc/apt is left
# as it is: the deb-src entry lives in a private apt configuration under a temporary folder.
#
# Two fixes against the plain tarball, both needed for Go >= 1.18:
#   1. the vendored github.com/modern-go/reflect2 1.0.1 crashes at start-up under Go >= 1.18: Debian's
#      1.0.2 replaces it;
#   2. pkg/generated/openapi is not in the tarball: it is generated with the vendored openapi-gen.
set -euo pipefail

OUT=$(realpath -m "${1:-build/kube-apiserver}")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends golang-go etcd-server openssl ca-certificates

# deb-src through a private apt configuration.
mkdir -p apt/lists/partial apt/sources.list.d
touch apt/sources.list
cat > apt/sources.list.d/bookworm-src.sources <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
EOF
A=(-o "Dir::Etc::SourceList=$WORK/apt/sources.list" -o "Dir::Etc::SourceParts=$WORK/apt/sources.list.d"
   -o "Dir::State::Lists=$WORK/apt/lists")
apt-get "${A[@]}" update -qq
apt-get "${A[@]}" source --download-only kubernetes
tar xzf kubernetes_1.20.5+really1.20.2.orig.tar.gz   # 34 MB: the full tree, vendor/ included

mkdir -p gopath/src/k8s.io
ln -sfn "$WORK/kubernetes-1.20.2" gopath/src/k8s.io/kubernetes
export GO111MODULE=off GOPATH="$WORK/gopath" CGO_ENABLED=0 GOFLAGS= GOCACHE="$WORK/gocache"
cd gopath/src/k8s.io/kubernetes

# 1) reflect2 1.0.2 from Debian instead of the vendored 1.0.1.
apt-get download golang-github-modern-go-reflect2-dev
dpkg -x golang-github-modern-go-reflect2-dev_*_all.deb r2
rm -rf vendor/github.com/modern-go/reflect2
cp -r r2/usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/

# 2) pkg/generated/openapi, from every package that asks for it.
go build -o openapi-gen ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
grep -rl --include='*.go' '^// *+k8s:openapi-gen=' pkg cmd plugin staging third_party test | xargs -n1 dirname \
  | sed 's|^staging/src/|vendor/|' | grep -vE '^vendor/k8s.io/(code-generator|sample-apiserver)/' \
  | LC_ALL=C sort -u > openapi-dirs
./openapi-gen -i "$(sed 's|^|k8s.io/kubernetes/|' openapi-dirs | paste -sd,)" \
  -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
  -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$WORK/openapi-report.txt"

# 3) the binary, with the version the server reports (/version, `kubectl version`).
LDF="-s -w"
for p in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  LDF="$LDF -X $p.gitVersion=v1.20.2 -X $p.gitMajor=1 -X $p.gitMinor=20"
done
go build -p "$(nproc)" -ldflags "$LDF" -o kube-apiserver ./cmd/kube-apiserver

install -D -m 755 kube-apiserver "$OUT/kube-apiserver"
"$OUT/kube-apiserver" --version
echo "built $OUT/kube-apiserver: export USERLOOP_KUBE_APISERVER=$OUT/kube-apiserver"
