"""Running federated rounds: set-up, the server loop, the local runtime, the client host and worker, held-out
evaluation and the run folder. Flower's apps (`spearfl.flower`) sit on top of these."""
