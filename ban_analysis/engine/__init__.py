"""Training: one step, the generation loop around it, the BAN chain, the run-folder writer, metrics.

``step.train_step`` is the one public training step (teacher logits -> student forward ->
objective -> hooks -> backward -> optimizer step); ``loop.train_generation`` runs epochs of it
with resume and checkpoints; ``chain.run_chain`` trains generation after generation into a run
folder written by ``runs.RunDir``; ``metrics`` scores logits.
"""
