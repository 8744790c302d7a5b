# Convenience wrappers; the scripts work without make (a fresh Debian may not have it).
.PHONY: test demo bootstrap bench
bootstrap:
	bash scripts/bootstrap-host.sh
test:
	bash scripts/test.sh
demo:
	bash scripts/demo.sh
bench: bootstrap
	.venv/bin/python bench/control_plane.py
