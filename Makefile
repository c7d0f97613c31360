# The two quick-start commands (see the README):
#
#   make demo    # the documented optimizer <-> echo exchange on a private broker
#   make test    # the test suite
#
# Each installs what is missing first: the apt packages (scripts/apt-install.sh,
# via sudo when not root) and a virtual environment in .venv (PEP 668-safe; the
# demo gets requirements.txt, the tests requirements-dev.txt).  A stamp file per
# requirements file makes the second run skip pip unless that file changed.
# PYTHON=python3.12 chooses the interpreter of the virtual environment.

PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?= -q
VPY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test apt-demo apt-test clean-venv
.NOTPARALLEL:

demo: apt-demo $(VENV)/.installed-requirements.txt
	$(VPY) examples/demo.py

test: apt-test $(VENV)/.installed-requirements-dev.txt
	$(VPY) -m pytest $(PYTEST_ARGS)

apt-demo:
	@PYTHON=$(PYTHON) scripts/apt-install.sh demo

apt-test:
	@PYTHON=$(PYTHON) scripts/apt-install.sh test

$(VPY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "make: mqbtt needs Python 3.10 or newer; $(PYTHON) is %d.%d (choose another with make PYTHON=python3.11 ...)" % sys.version_info[:2])'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-requirements.txt: requirements.txt | $(VPY)
	$(VPY) -m pip install -q -r requirements.txt
	@touch $@

# requirements-dev.txt includes requirements.txt: one install serves both stamps
$(VENV)/.installed-requirements-dev.txt: requirements-dev.txt requirements.txt | $(VPY)
	$(VPY) -m pip install -q -r requirements-dev.txt
	@touch $@ $(VENV)/.installed-requirements.txt

clean-venv:
	rm -rf $(VENV)
