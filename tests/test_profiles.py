import pytest
import tomllib

from samout_edge.artifact.arch import arch_spec
from samout_edge.artifact.config import PRESETS
from samout_edge.artifact.graph import PREFILL_UBATCH
from samout_edge.errors import SamoutError
from samout_edge.profiles import list_profiles, load_profile, parse_profile
from samout_edge.profiles.memory_plan import estimate, longest_context, memory_plan

REQUIRED = {"jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "jetson-thor", "rtx-desktop", "datacenter"}


def test_all_required_profiles_ship_and_validate():
    profiles = {p.name: p for p in list_profiles()}
    assert REQUIRED <= set(profiles)
    nano = profiles["jetson-orin-nano-8gb"]
    assert (nano.compute_capability, nano.tensorrt, nano.dla_cores, nano.memory_gib) == ("8.7", "10.3", 0, 8.0)
    assert profiles["jetson-orin-nx-16gb"].dla_cores == 2 and profiles["jetson-thor"].tensorrt == "10.13"


def good_profile() -> dict:
    return tomllib.loads(shipped_text("jetson-orin-nano-8gb"))


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda d: d.pop("tensorrt"), "'tensorrt' is missing"),
        (lambda d: d.update(precision="int4"), "'precision' must be one of"),
        (lambda d: d["prefill"].update(seq=[8, 4, 16]), "'prefill.seq' must satisfy"),
        (lambda d: d["decode"].update(batch=[1, 2]), "'decode.batch' must be [min, opt, max]"),
        (lambda d: d.update(memory_budget_gib=99.0), "'memory_budget_gib' must be above 0 and at most"),
        (lambda d: d.update(builder_optimization_level=9), "'builder_optimization_level' must be 0..5"),
        (lambda d: d.update(compute_capability="sm87"), "'compute_capability' must look like"),
        (lambda d: d.update(colour="green"), "'colour' is not a profile field"),
        (lambda d: d["bench"].update(seqs=[0]), "'bench.seqs' must be a non-empty list"),
        (lambda d: d["decode"].update(window=3), "'decode.window' is not a field"),
        (lambda d: d.update(dla_cores="two"), "'dla_cores' must be int"),
    ],
)
def test_bad_profile_names_the_field(mutate, field):
    data = good_profile()
    mutate(data)
    with pytest.raises(SamoutError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_profile(data, "mine.toml")


def shipped_text(name: str) -> str:
    from importlib import resources

    return resources.files("samout_edge.profiles").joinpath(f"data/{name}.toml").read_text()


def test_user_profile_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(shipped_text("rtx-desktop").replace('name = "rtx-desktop"', 'name = "my-rtx"'))
    assert load_profile(path).name == "my-rtx"
    (tmp_path / "broken.toml").write_text("name = [unclosed")
    with pytest.raises(SamoutError, match="not valid TOML"):
        load_profile(tmp_path / "broken.toml")
    with pytest.raises(SamoutError, match="unknown profile 'nope'"):
        load_profile("nope")
    with pytest.raises(SamoutError, match="profile file not found"):
        load_profile(tmp_path / "missing.toml")


def test_memory_plan_state_constant_for_cummax_and_linear_for_softmax():
    nano = load_profile("jetson-orin-nano-8gb")
    seed = PRESETS["seed"]
    a = estimate(seed, arch_spec("cummax"), "fp16", 1, 1024, 512, nano)
    b = estimate(seed, arch_spec("cummax"), "fp16", 1, 65536, 512, nano)
    assert a.state == b.state == 2 * 6 * 8 * 64 * 2  # double-buffered 6 KiB
    s1, s2 = (estimate(seed, arch_spec("softmax"), "fp16", 1, n, 512, nano) for n in (1024, 2048))
    assert s2.state == 2 * s1.state
    assert a.weights == seed.parameter_count() * 2


def test_longest_context_per_profile():
    for profile in list_profiles():
        plan = memory_plan(PRESETS["seed"], profile)
        assert plan.longest["cummax"] is None  # memory never bounds the cummax context
        n = plan.longest["softmax"]
        assert n > 0
        assert plan.chunk == min(profile.prefill.seq.opt, PREFILL_UBATCH)  # the profile's opt prefill, in calls of --ubatch
        fits = estimate(PRESETS["seed"], arch_spec("softmax"), profile.precision, 1, n, plan.chunk, profile)
        over = estimate(PRESETS["seed"], arch_spec("softmax"), profile.precision, 1, n + 1, plan.chunk, profile)
        assert fits.total <= profile.memory_budget_bytes < over.total


def test_a_model_too_big_fits_nowhere():
    from samout_edge.artifact.config import ModelConfig

    huge = ModelConfig(vocab_size=250000, hidden_size=8192, num_heads=64, num_layers=80)
    nano = load_profile("jetson-orin-nano-8gb")
    assert longest_context(huge, arch_spec("cummax"), "fp16", 1, 512, nano) == 0
