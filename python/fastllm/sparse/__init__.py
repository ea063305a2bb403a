"""Deja Vu contextual sparsity for Llama-family (SiLU-gated) and OPT (ReLU) models.

    preds = fastllm.sparse.train_predictors(model, calibration_ids)      # int8 gate/up (gated)
    preds.save("preds.safetensors")
    fastllm.sparse.sparsify(model, 0.5, mode="predictor", predictors=preds)
    ...  # decode as usual: the MLPs now read only the predicted neurons
    fastllm.sparse.densify(model)                                         # exact original

``mode="threshold"`` needs no training: per-layer thresholds on ``|act(gate)|`` are calibrated to
the target sparsity from ``calibration_ids`` (CATS style). ``mode="oracle"`` keeps each token's
largest ``|h|`` (quality upper bound). For gated MLPs the default predictor is an int8 copy of
the gate and up weights (``kind="quantized"``), not a trained low-rank map. See
:class:`fastllm.nn.SparseMLP` for the per-call options.

Cheaper quantized selections (``quantize_predictors`` / ``train_predictors(kind="quantized")``,
also through ``sparsify(..., mode="predictor", calibration_ids=..., bits=..., score=...)``):
``bits=4`` (int4 gate+up, group 32, stored packed two per byte), ``bits=8``, ``score="gate"``
(CATS-style ``|act(gate)|`` from the quantized gate only) and ``input_keep`` (WINA-style: score
from each token's top input channels by ``|x_i| ||W[:, i]||``). :func:`predictor_bytes_share`
gives their bytes. Measured on SmolLM2 (``bench/sparse_budget_study.py``, held-out text, 50%
sparsity, ppl vs dense; bytes = predictor + kept rows as a share of the dense fp16 MLP): oracle
+4.5%; int8 gate+up +3.4%, 0.85; int4 gate+up +4.8%, 0.71; int8 gate +40%; int4 gate +46%;
int8 gate+up with half the input channels +11%; threshold mode +30%. The op reads int4 packed,
so int4 gate+up is the default for every dtype (:func:`default_quantized_selection`); the
``input_keep`` saving needs a column-gather kernel, which is not written (the op reads every
column).

Layout: ``_sites`` finds the MLPs and installs / removes the sparse views; ``calibrate`` holds
threshold mode; ``predictors`` trains, quantizes, costs and saves predictors; ``api`` is
``sparsify`` and ``allocate_sparsity``. Everything public is re-exported here.
"""

from .._ops.sparse import sparse_mlp  # noqa: F401
from ._sites import (_make_view, _model_identity, _reinstall, collect_mlp_data,  # noqa: F401
                     densify, find_mlps)
from .api import SPARSIFY_MODES, allocate_sparsity, sparsify  # noqa: F401
from .calibrate import calibrate_thresholds, gate_magnitudes, thresholds_from_magnitudes
from .predictors import (PredictorMismatchError, Predictors,  # noqa: F401
                         default_quantized_selection, default_rank, fit_factored_predictors,
                         predictor_bytes_share, predictor_cost, quantize_predictors, share_labels,
                         train_predictors)

__all__ = ["sparsify", "densify", "train_predictors", "Predictors", "find_mlps",
           "calibrate_thresholds", "gate_magnitudes", "thresholds_from_magnitudes",
           "collect_mlp_data", "PredictorMismatchError", "default_rank", "predictor_cost",
           "fit_factored_predictors", "quantize_predictors", "allocate_sparsity",
           "predictor_bytes_share", "default_quantized_selection"]
