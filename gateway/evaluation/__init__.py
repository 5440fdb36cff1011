"""Quality, not only format: evaluators declared per route (a judge's rubric, a pairwise judge with the
order swapped, deterministic checks) run in the background on sampled answers and shadow pairs; their
results become metrics, span events, pair verdicts and rollout gates."""
