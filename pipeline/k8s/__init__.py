"""forgeline on Kubernetes, without dagster: manifest builders (:mod:`~pipeline.k8s.manifests`),
the multi-node training Job runner (:mod:`~pipeline.k8s.runner`), the /dev/shm pre-warm loop
(:mod:`~pipeline.k8s.prewarm`) and its command line (``python -m pipeline.k8s``)."""
