"""The instance catalog: the facts users pick instances by."""

from launcher.instances import catalog

FAMILIES = ["ml.g4dn", "ml.g5", "ml.g6", "ml.g6e", "ml.p3", "ml.p3dn", "ml.p4d", "ml.p4de", "ml.p5"]


def test_every_family_users_pick_is_there():
    families = {i.family for i in catalog().instances.values()}
    assert set(FAMILIES) <= families


def test_the_seed_tables_mistakes_are_not_repeated():
    cat = catalog()
    assert cat.get("ml.g4dn.xlarge").gpu.model == "T4"  # not a V100
    assert "ml.p4d.8xlarge" not in cat.instances  # there is no such instance
    assert cat.suggest("ml.p4d.8xlarge") == "ml.p4d.24xlarge"


def test_gpu_facts():
    cat = catalog()
    p4d = cat.get("ml.p4d.24xlarge")
    assert (p4d.gpu.model, p4d.gpu_count, p4d.gpu.bf16) == ("A100-40", 8, True)
    assert 38 < p4d.gpu.memory_gib < 40
    assert cat.get("ml.p4de.24xlarge").gpu.memory_gib > 78
    assert not cat.get("ml.p3.2xlarge").gpu.bf16 and not cat.get("ml.g4dn.xlarge").gpu.bf16
    assert cat.get("ml.g5.48xlarge").gpu_count == 8 and cat.get("ml.g5.xlarge").gpu.model == "A10G"
    assert cat.get("ml.g6e.xlarge").gpu.model == "L40S" and cat.get("ml.p5.48xlarge").gpu.model == "H100"
    assert not cat.get("ml.p3.2xlarge").gpu.flash_attention and cat.get("ml.g5.xlarge").gpu.flash_attention


def test_every_instance_has_a_price_and_the_date_it_was_read():
    cat = catalog()
    assert cat.prices_read and cat.region == "us-east-1"
    assert all(i.price_per_hour > 0 for i in cat.instances.values())
    # Bigger instances of one family cost more per hour, except the odd 16xlarge sizes.
    assert cat.get("ml.p4de.24xlarge").price_per_hour > cat.get("ml.p4d.24xlarge").price_per_hour
    lo, hi = cat.spot_discount_range
    assert 0 < lo < hi < 1
