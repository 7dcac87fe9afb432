"""Training: the one optimisation loop both recipes run (loop.fit), the losses (losses), the ITM
hard negatives and word swaps (negatives), training from captions (recipe) and fine-tuning from the
app's relevance labels (finetune)."""
