# The two commands of the README. Both set up ./.venv first (idempotent).
.PHONY: quickstart test test-slow bench

quickstart:
	scripts/setup.sh
	.venv/bin/rmx-local run recipes/quickstart.toml

test:
	scripts/setup.sh dev
	.venv/bin/python -m pytest -q

test-slow:
	scripts/setup.sh dev
	.venv/bin/python -m pytest -q -m slow

bench:
	.venv/bin/python benchmarks/quickstart.py
