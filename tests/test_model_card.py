"""The model card's description of the objective and of the sequences follows the settings."""

from conftest import tiny_args
from trl_mgsr import MGSRConfig
from trl_mgsr.model_card import objective, sequences


def test_objective_names_each_terms_formulation_and_leaves_out_zero_weights(tmp_path):
    args = tiny_args(MGSRConfig, tmp_path)
    assert objective(args) == ("1 · DAC-KL (reverse divergence to the teacher clipped to a learned band) "
                               "+ 0.1 · forward divergence to the whole teacher at the "
                               "SCRG-corrected tokens")  # the SFT and span terms are off by default
    assert " + 0.1 · span (loglik) + " in objective(tiny_args(MGSRConfig, tmp_path, span_weight=0.1))
    assert objective(tiny_args(MGSRConfig, tmp_path, sft_weight=1.0)).startswith("1 · SFT + 1 · DAC-KL (reverse")
    assert objective(tiny_args(MGSRConfig, tmp_path, dac_rescue_weight=3.0)).startswith(
        "1 · DAC-KL (reverse divergence to the teacher clipped to a learned band, with a 3 · −log(student mass in the "
        "band) rescue on sequences it did not sample) + ")
    args = tiny_args(MGSRConfig, tmp_path, scrg_correction_divergence="reverse")
    assert objective(args).endswith("0.1 · reverse divergence to the whole teacher at the SCRG-corrected tokens")
    args = tiny_args(MGSRConfig, tmp_path, sft_weight=0.0, span_weight=0.0, scrg_correction_weight=0.0,
                     dac_mode="fixed", dac_hi=0.9, dac_divergence="jsd")
    assert objective(args) == "1 · DAC-KL (jsd divergence to the teacher clipped to the fixed band [0, 0.9])"


def test_sequences_say_where_samples_come_from_and_what_scrg_does(tmp_path):
    text = sequences(tiny_args(MGSRConfig, tmp_path, lmbda=0.5))
    assert "`lmbda=0.5`" in text and "dataset's completions" in text and "error rule `first_rejected`" in text
    assert "the sample ends at the correction" in sequences(tiny_args(MGSRConfig, tmp_path, scrg_continuation="stop"))
    assert "the student re-generates the rest" in sequences(
        tiny_args(MGSRConfig, tmp_path, scrg_continuation="regenerate"))
    text = sequences(tiny_args(MGSRConfig, tmp_path, lmbda=0.5, seq_kd=True, scrg_rounds=0))
    assert "teacher's samples (`seq_kd`)" in text and text.endswith("SCRG off")
    assert sequences(tiny_args(MGSRConfig, tmp_path, schedule="adaptive")).startswith("DistiLLM's adaptive schedule")
