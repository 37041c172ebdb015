"""MODEL -> transformers config -> module (meta, fake, cpu or cuda), what it is (ModelInfo), what trains
(setups: LoRA, QLoRA, freezing, attention), and copies of its first layers that stand for it."""
