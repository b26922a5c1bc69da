"""Tools around training, not part of a training step: `export` (`qed-export`), `tiny` (`qed-make-tiny`),
`layout_sim` (the layout simulator) and `model_card`."""
