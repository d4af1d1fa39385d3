# NodeFoundry: `make run` starts the server on embedded defaults, `make test` runs every test.
# Both call `make setup`, which installs what they need (Debian packages, a Python venv) and is idempotent.

SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3
DEB_PACKAGES := python3-venv python3-dev gcc debconf dash busybox sqlite3 curl \
	debian-installer-12-netboot-amd64 debian-installer-12-netboot-arm64 ipxe \
	mosquitto mosquitto-clients udhcpc isc-dhcp-client qemu-system-x86 ipxe-qemu ovmf \
	wrk nginx-light psmisc iproute2 dnsmasq-base \
	isc-dhcp-relay tftp-hpa python3-paho-mqtt \
	mmdebstrap systemd-container openssh-client
STAMP := $(VENV)/.setup-stamp

.PHONY: setup run test test-roles lint format bench bench-dhcp bench-mqtt bench-inventory collection clean sanity ansible-units collection-tests

setup: debian-packages $(STAMP)

debian-packages:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "make setup: installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		systemctl disable --now nginx mosquitto isc-dhcp-relay >/dev/null 2>&1 || true; \
	fi

$(STAMP): server/pyproject.toml agent/pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e agent -e server -r requirements-dev.txt
	touch $@

run: setup
	@mkdir -p data
	@test -d data/assets/debian-installer/amd64 || $(BIN)/nodefoundry-server assets import
	$(BIN)/nodefoundry-server run

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# ansible-test works only inside ansible_collections/<namespace>/<name>: run_ansible_test.py copies the
# collection under a temporary one (see its docstring for what sanity covers and why).
sanity: setup
	$(BIN)/python tests/ansible/run_ansible_test.py sanity

ansible-units: setup
	$(BIN)/python tests/ansible/run_ansible_test.py units

# The collection's tests alone; `make test` runs them too (the pytest part with every other test).
collection-tests: sanity ansible-units
	$(BIN)/pytest tests/ansible tests/unit/plugins

# Two workers (the machines have two cores; most tests wait on servers, firmware or machines they
# boot), each taking whole test files so module-scoped servers are started once.
TEST_WORKERS ?= 2

test: lint sanity ansible-units
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

# Role tests: every Molecule scenario in extensions/molecule/ on Debian 12 machines booted by
# systemd-nspawn in a network namespace (tests/roles/README.md). Needs root.
test-roles: setup
	$(BIN)/pytest tests/roles

bench: setup
	$(BIN)/python bench/http_bench.py
	$(BIN)/python bench/dhcp_storm.py
	$(BIN)/python bench/mqtt_ingest.py
	$(BIN)/python bench/agent_footprint.py --seconds 300
	$(BIN)/python bench/inventory_bench.py

bench-dhcp: setup
	$(BIN)/python bench/dhcp_storm.py

bench-mqtt: setup
	$(BIN)/python bench/mqtt_ingest.py
	$(BIN)/python bench/agent_footprint.py --seconds 300

bench-inventory: setup
	$(BIN)/python bench/inventory_bench.py

collection: setup
	rm -rf build/collection && mkdir -p build/collection
	$(BIN)/ansible-galaxy collection build --force --output-path build/collection .

clean:
	rm -rf build .pytest_cache
