"""Zero-shot captioning from text-only training (MacCap, CapDec) on a frozen contrastive backbone."""
