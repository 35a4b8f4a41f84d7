# The two commands a newcomer needs:
#   make demo   set everything up, then run the whole system locally on one verified upload
#   make test   set everything up, then run the test suite (real Redis, SeaweedFS, moto, workers)
# Works on a fresh Debian with Python 3.11; installs what is missing (as root, via apt-get).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo lint test chaos bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@test -x /usr/sbin/rabbitmq-server || command -v rabbitmq-server >/dev/null 2>&1 || { \
	  echo "installing rabbitmq-server (Debian package: the tests' RabbitMQ broker)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null; }
	@$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c "import ensurepip" 2>/dev/null || { \
	  echo "installing python3-venv (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,local]"
	@touch $(STAMP)

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/pip install -q -e ".[test,local,bench]"
	@touch $@

demo: setup
	$(BIN)/uploader demo

# ruff over the whole tree, mypy over the library and the workers (config in pyproject.toml).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy uploader workers

test: setup
	$(BIN)/pytest

chaos: setup
	UPLOADER_CHAOS_SCALE=full $(BIN)/pytest tests/chaos -s

bench: $(VENV)/.bench-installed
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) *.egg-info
