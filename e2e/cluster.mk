# Local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, test kubelet).
# Included by the top-level Makefile, which defines PY and VENV. See docs/local-cluster.md.

LOCALCLUSTER := PYTHONPATH=e2e $(PY) -m localcluster
CLUSTER_RUN_DIR ?= .run/cluster

.PHONY: cluster-bins cluster-up cluster-down cluster-status

cluster-bins: venv ## Build (first run only) or locate etcd, kube-apiserver, kube-controller-manager, kubectl
	@PYTHONPATH=e2e $(PY) -m localcluster.binaries

cluster-up: cluster-bins ## Start a local cluster in the background; print the KUBECONFIG and how to run the operator
	@$(LOCALCLUSTER) up --run-dir $(CLUSTER_RUN_DIR)

cluster-down: ## Stop the cluster started by `make cluster-up` (and anything it left behind)
	@$(LOCALCLUSTER) down --run-dir $(CLUSTER_RUN_DIR)

cluster-status: ## Print the KUBECONFIG of the running local cluster, if any
	@$(LOCALCLUSTER) status --run-dir $(CLUSTER_RUN_DIR)

.PHONY: argocd-bin
argocd-bin: venv ## Build (first run only, about 8 min) or locate Argo CD v3.2.11 for the GitOps tests
	@PYTHONPATH=e2e $(PY) -m localcluster.argocd
.PHONY: helm-bin
helm-bin: venv ## Build (first run only) or locate the Helm 3 CLI the chart tests use (HELM=path wins)
	@PYTHONPATH=e2e $(PY) -m localcluster.helm

# `make test` (scripts/test.sh) builds cluster-bins, helm-bin and argocd-bin in the background while
# tests/ runs, and starts e2e/ once they are done: the builds never happen inside a test.
