"""Every benchmark case, with shapes from the real models."""

from benchmarks.cases_accelerate import CASES as ACCELERATE_CASES
from benchmarks.cases_dilated_feature_enhancement import CASES as DFE_CASES
from benchmarks.cases_models import CASES as MODEL_CASES
from benchmarks.cases_multiscale_pool import CASES as POOL_CASES
from benchmarks.cases_window_attention import CASES as WINDOW_CASES

CASES = POOL_CASES + DFE_CASES + WINDOW_CASES + ACCELERATE_CASES + MODEL_CASES
