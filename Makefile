# OpenSDS for Kubernetes. `make up` brings the system up locally; `make test` runs every check.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(CURDIR)/bin:$(PATH)

.PHONY: all deps venv tools images proto lint typecheck unit integration test chaos e2e up down cluster-up cluster-down node-up node-down bench clean

all: test

venv: deps $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	bash hack/link-ceph-bindings.sh $(VENV)
	touch $@

deps:                        ## install (as root) or name the Debian packages the README's commands need
	bash hack/deps.sh

tools:                       ## build the pinned Kubernetes/CSI toolchain into bin/
	bash hack/tools.sh

images: venv tools           ## OCI archives in .images/: the project image, sidecars, busybox, pause
	bash hack/images.sh build

proto: venv                  ## regenerate CSI stubs from the pinned csi.proto
	$(PY) hack/protogen.py

lint: venv
	$(VENV)/bin/ruff check .

typecheck: venv
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest -q tests/unit

integration: venv tools images
	$(PY) -m pytest -q -m "not chaos" tests/integration

# One pytest run over unit + integration so its closing line counts every test.
# pytest exits 5 when it collected nothing; make treats that (like any non-zero) as failure.
test: lint typecheck tools images
	$(PY) -m pytest -q -rs -m "not chaos" tests

chaos: venv tools            ## 300 CSI operations under SIGKILLs and an apiserver restart (minutes)
	$(PY) -m pytest -q -rs -s -m chaos tests/integration

e2e: venv tools              ## real-kernel VM tier: the tests in e2e/vm run inside hack/vm.sh
	bash hack/e2e.sh

up: venv tools images        ## control plane + a kubelet node + the Helm chart from local images + sample pods on PVCs
	bash hack/up.sh

down:
	bash hack/down.sh

cluster-up:
	bash hack/cluster.sh up

cluster-down:
	bash hack/cluster.sh down

node-up:                     ## containerd + kubelet node(s) in network namespaces, joined to the control plane
	bash hack/node.sh up

node-down:
	bash hack/node.sh down

clean:
	bash hack/cluster.sh reset || true
	rm -rf .run
