# The guide's make targets, as thin wrappers over the k8s4r CLI (run from source with Deno).
K8S4R := deno run -A main.ts

.PHONY: build build-all dev-start dev-status dev-logs dev-stop dev-clean test test-spire-e2e doctor

build build-all:
	deno task check

dev-start:
	$(K8S4R) devenv start

dev-status:
	$(K8S4R) devenv status

dev-logs:
	$(K8S4R) devenv logs

dev-stop:
	$(K8S4R) devenv stop

dev-clean:
	$(K8S4R) devenv clean

doctor:
	$(K8S4R) doctor

test:
	deno task test

test-spire-e2e:
	deno task e2e
