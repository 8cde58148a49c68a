"""The registry methods of ``markovsim.methods`` on Hugging Face transformers: ONE layer for the Markov
transformers (``llm.methods.markov``) and the TOFU protocol (``llm.tofu``). docs/theory.md, "Other
unlearning methods", has the equations; every formula here is the ``markovsim.methods`` piece applied to
transformer log-probabilities (never re-derived).

API (batch level, data-format agnostic)::

    state = prepare_method(name, model, forget=None, retain=None, fine_tune=None, config=None,
                           unseen=None, batches=None, lora=None, layer=-1, seed=0) -> MethodState
        once, before unlearning; ``fine_tune(model_copy, data, settings: FineTuneConfig) -> model`` is the
        caller's trainer (Markov: llm.methods.markov.markov_fine_tune; TOFU: a wrapper of llm.tofu.finetune);
        ``batches(data) -> iterable of HF batches`` (KGA's unseen gap). ``model`` is left unchanged.
    batch = MethodBatch(forget, MethodCounts(n_f, N_f, n_r, N_r, n_m), retain=None, mismatch=None,
                        forget_ref_logps=None)             or MethodBatch.single(forget, retain, mismatch, ref)
    required_batches(state) -> the MethodBatch fields the method needs
    total, terms = method_loss(state, model, batch, context=None, reduce_sum=None, part="all")
        -> MethodTerms(total, terms, forget_logps, forget_num_tokens); minimise total
    step_context(state, model, batch, reduce_sum=None) -> StepContext(forget_gap, perturbation)
    apply_task_negation(model, fine_tuned, scale) -> model   (TaskNegation: an update rule, in place;
        fine_tuned = state.auxiliary["fine_tuned"], a full model / state dict or a peft LoRA model)
    decoder_layers(model), perturbed_hidden_states(model, layer, delta)   (LAU's hook)

Markov transformers (llm.methods.markov)::

    unlearn_method(model, name, forget, retain=None, config=PAPER_UNLEARNING, evaluator=None,
                   method_config=None, unseen=None, run_dir=None, resume=False, lora=None, layer=-1,
                   scales=None) -> Trajectory        (python -m llm unlearn --method NAME)

HF batches are ``{input_ids, attention_mask, labels}`` (b, t), labels -100 where no loss (llm.data and
llm.tofu.format both produce them). Which batches each method needs (``required_batches``):

    GA+Mismatch   forget, mismatch (forget prompts + random normal responses), retain (= normal data)
    WHP, SeUL     forget
    KGA           forget, retain
    AdvGA/AdvNPO  forget (+ retain for a retain term; + forget_ref_logps for NPO)
    TaskNegation  none: apply_task_negation

Data parallelism: counts are GLOBAL (every term is a share; shares add up over processes); KGA's |.| and
LAU's shared delta need the global forget gap / ascent direction: pass ``reduce_sum`` (a sum over
processes) or a ``context`` computed from the global batch.

Choices (uncertain where the paper is): WHP's v are the RAW logits (full vocabulary); KGA's auxiliary models
are fine-tuned by ``fine_tune`` from a copy of the original (``auxiliary_from="reference"``) or from a fresh
initialisation of the same config (``"scratch"``, the paper's models trained on D_f / D_n alone; meaningful
for small models only); LAU's delta is ONE (d,) vector added to every row's and position's output hidden
state of decoder layer ``layer`` (default -1, the last layer: the simulator's logit-space analogue), inner
PGD from 0 with ``markovsim.methods.lau.adversarial_perturbation``, outer gradient with delta* fixed
(Danskin); epsilon 0 (or inner_steps 0) is exactly GA / NPO. Decoder layers: GPT-2 ``transformer.h``,
Llama / SmolLM2 ``model.layers``, paper-synthetic ``blocks`` (``llm.methods.layers``).
"""

from .batch import MethodBatch, MethodCounts, MethodTerms, label_tokens
from .layers import decoder_layers, perturbed_hidden_states, unwrap_model
from .losses import StepContext, method_loss, required_batches, step_context, token_kl_share
from .markov import default_method_config, markov_fine_tune, unlearn_method
from .state import MethodState, frozen_copy, prepare_method, replace_config
from .task_negation import apply_task_negation, full_task_vector, lora_task_vector

__all__ = ["MethodBatch", "MethodCounts", "MethodTerms", "label_tokens", "decoder_layers", "perturbed_hidden_states",
           "unwrap_model", "StepContext", "method_loss", "required_batches", "step_context", "token_kl_share",
           "MethodState", "frozen_copy", "prepare_method", "replace_config", "apply_task_negation",
           "full_task_vector", "lora_task_vector", "default_method_config", "markov_fine_tune", "unlearn_method"]
