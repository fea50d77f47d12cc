# Two set-up commands work on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs the project into it when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench clean sysdeps

# System tools the end-to-end tests drive as a user would: curl (SOCKS5 client) and iptables (REDIRECT
# to the 15001 outbound listener inside a network namespace). Installed only when missing, and only
# where we can (root with apt-get); otherwise the tests that need them skip and say why.
SYSDEPS_CMDS := curl iptables
sysdeps:
	@missing=""; for c in $(SYSDEPS_CMDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing system packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || echo "warning: could not install$$missing; tests needing them will skip"; \
	  else echo "note: missing$$missing (not root or no apt-get); tests needing them will skip"; fi; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hbone-proxy demo

test: $(STAMP) sysdeps
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
