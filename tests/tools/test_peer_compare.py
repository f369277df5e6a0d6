import json

from tools.peer_compare import rows, vllm_result


def test_rows_pair_the_curves_and_give_ratios(tmp_path):
    log = tmp_path / "vllm.log"
    vllm = {"decode_tok_s_by_batch": {"1": 500.0, "8": 4000.0}, "w1_tok_s_end_to_end": 480.0,
            "w1_decode_tok_s": 490.0, "w2_output_tok_s": 20000.0, "w2_seconds": 6.7, "w2_output_tokens": 133966}
    log.write_text("INFO noise\nRESULT " + json.dumps(vllm) + "\n")
    curve = {"decode_tok_s_by_batch": {"1": 1000.0, "32": 9000.0}, "tok_s": 960.0, "decode_tok_s": 1000.0}
    w2 = {"output_tok_s": 25000.0, "seconds": 5.36, "seconds_runs": [5.3, 5.36, 5.5], "output_tokens": 133966}
    got = {r[0]: r for r in rows(vllm_result(str(log)), curve, w2)}
    assert got["decode tok/s, batch 1"][1:] == ("1000.0", "500.0", "2.00x")
    assert got["decode tok/s, batch 8"][1:] == ("-", "4000.0", "-")  # a batch only one side ran
    assert got["decode tok/s, batch 32"][3] == "-"
    assert got["W1 tok/s (decode)"][3] == "2.00x"
    assert got["W2 output tok/s (s)"][3] == "1.25x" and "5.30/5.36/5.50" in got["W2 output tok/s (s)"][1]
    assert "W2 output tokens differ" not in got


def test_missing_sides_and_differing_token_counts(tmp_path):
    assert vllm_result(str(tmp_path / "absent.log")) == {}
    got = {r[0]: r for r in rows({"w2_output_tok_s": 1.0, "w2_output_tokens": 10}, {}, {"output_tok_s": 2.0,
                                                                                       "output_tokens": 11})}
    assert got["W2 output tokens differ"][1:3] == ("11", "10")
    assert got["W1 tok/s (decode)"][3] == "-"
