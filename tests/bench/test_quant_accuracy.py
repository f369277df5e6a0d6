"""bench/quant_accuracy's variant selection (--only): exact names alone, other parts as substrings."""

from __future__ import annotations

from meshserve.bench.quant_accuracy import CALIBRATED, TEXT_CALIBRATED, VARIANTS, select_variants

ALL = VARIANTS + TEXT_CALIBRATED + CALIBRATED
RECIPE = "int4 GPTQ act-order, AWQ scales then sequential GPTQ, searched static group levels"


def test_an_exact_name_picks_that_variant_even_when_it_prefixes_others():
    assert sum(v.name.startswith(RECIPE) for v in ALL) > 1  # the case this is for
    (picked,) = select_variants(ALL, [RECIPE])
    assert picked.name == RECIPE and picked.calibration == "awq-scale-gptq-mse-seq" and picked.desc_act


def test_other_parts_match_as_substrings_and_none_keeps_all():
    assert select_variants(ALL, None) == ALL
    fp8 = select_variants(ALL, ["fp8 KV"])
    assert fp8 and all("fp8 KV" in v.name for v in fp8)
    # "int4 AWQ" is a variant's whole name: it alone, not every "int4 AWQ, ..." row; "AWQ-calibrated" is a part
    picked = select_variants(ALL, ["int4 AWQ", "AWQ-calibrated"])
    assert picked == [v for v in ALL if v.name == "int4 AWQ" or "AWQ-calibrated" in v.name] and len(picked) > 2
