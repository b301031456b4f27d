"""The maths that plans a training run before compute is spent.

- model arithmetic: `resolve_model`, `summarize` (params total/active, FLOPs/token, KV bytes)
- training memory: `TrainingPlan`, `training_memory`, `model_state_bytes`, `comm_bytes_per_step`; fit and advice: `check_fit`
- inference memory: `inference_memory`, `max_batch`; the decode roofline: `decode_bound`
- time and cost: `training_time`
- compute-optimal sizing: `ScalingLaw`, `PUBLISHED`, `optimal_by_ratio`
- scaling-law fits: `fit_chinchilla`, `fit_power_law`, `read_runs`, `plot_chinchilla_fit`
- gradient noise scale: `noise_scale`, `measure_noise_scale`, `NoiseScaleTracker`
- sweeps of tiny models: `SweepConfig`, `run_sweep`
"""
from lmforge.plan.advice import Verdict, check_fit
from lmforge.plan.arithmetic import ModelSummary, kv_cache_bytes_per_token, resolve_model, summarize
from lmforge.plan.fitting import FitResult, PowerLaw, fit_chinchilla, fit_power_law, predict_interval
from lmforge.plan.gpus import GPUS, custom_gpu, get_gpu
from lmforge.plan.inference import decode_bound, inference_memory, max_batch
from lmforge.plan.laws import PUBLISHED, ScalingLaw, get_law, optimal_by_ratio
from lmforge.plan.memory import TrainingPlan, comm_bytes_per_step, model_state_bytes, training_memory
from lmforge.train.noise_scale import NoiseScale, NoiseScaleTracker, measure_noise_scale, noise_scale
from lmforge.plan.plots import plot_chinchilla_fit, plot_power_law
from lmforge.plan.runs import Runs, read_runs, write_runs
from lmforge.plan.sweep import SweepConfig, run_sweep
from lmforge.plan.timing import TrainingTime, training_time

__all__ = [
    "Verdict", "check_fit", "ModelSummary", "kv_cache_bytes_per_token", "resolve_model", "summarize",
    "FitResult", "PowerLaw", "fit_chinchilla", "fit_power_law", "predict_interval", "GPUS", "custom_gpu",
    "get_gpu", "decode_bound", "inference_memory", "max_batch", "PUBLISHED", "ScalingLaw", "get_law", "optimal_by_ratio",
    "TrainingPlan", "comm_bytes_per_step", "model_state_bytes", "training_memory", "NoiseScale", "NoiseScaleTracker",
    "measure_noise_scale", "noise_scale", "plot_chinchilla_fit", "plot_power_law", "Runs", "read_runs",
    "write_runs", "SweepConfig", "run_sweep", "TrainingTime", "training_time",
]
