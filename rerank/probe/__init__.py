"""The attention probe: model loading (:mod:`.model`), the prompt with exact token spans (:mod:`.prompt`),
the attention capture during one prefill (:mod:`.capture`), passage scores from the captured rows
(:mod:`.scoring`), the positional-bias calibrators (:mod:`.calibrators`) and the probe runs a curve fit
needs (:mod:`.fit`). Importing this package imports no torch."""
