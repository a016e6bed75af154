"""What the three training scripts share: options, data, torchrun, scoring, the peer baselines."""
