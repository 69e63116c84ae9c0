"""VN_AQI (Decision 1459/QĐ-TCMT) from the formula in DOMAIN.md: every breakpoint segment, NowCast, validity."""

from __future__ import annotations

import pytest

from streams import aqi

# (pollutant, concentration, expected sub-index): both ends of every segment of Table 2.
SEGMENTS = [
    ("pm25", 0, 0),
    ("pm25", 25, 50),
    ("pm25", 50, 100),
    ("pm25", 80, 150),
    ("pm25", 150, 200),
    ("pm25", 250, 300),
    ("pm25", 350, 400),
    ("pm25", 500, 500),
    ("pm10", 50, 50),
    ("pm10", 150, 100),
    ("pm10", 250, 150),
    ("pm10", 350, 200),
    ("pm10", 420, 300),
    ("pm10", 500, 400),
    ("pm10", 600, 500),
    ("o3", 160, 50),
    ("o3", 200, 100),
    ("o3", 300, 150),
    ("o3", 400, 200),
    ("o3", 800, 300),
    ("o3", 1000, 400),
    ("o3", 1200, 500),
    ("no2", 100, 50),
    ("no2", 200, 100),
    ("no2", 700, 150),
    ("no2", 1200, 200),
    ("no2", 2350, 300),
    ("no2", 3100, 400),
    ("no2", 3850, 500),
    ("so2", 125, 50),
    ("so2", 350, 100),
    ("so2", 550, 150),
    ("so2", 800, 200),
    ("so2", 1600, 300),
    ("so2", 2100, 400),
    ("so2", 2630, 500),
    ("co", 10000, 50),
    ("co", 30000, 100),
    ("co", 45000, 150),
    ("co", 60000, 200),
    ("co", 90000, 300),
    ("co", 120000, 400),
    ("co", 150000, 500),
]


@pytest.mark.parametrize(("pollutant", "c", "expected"), SEGMENTS)
def test_sub_index_at_breakpoints(pollutant: str, c: float, expected: float) -> None:
    assert aqi.sub_index(pollutant, c) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("pollutant", "lo", "hi", "i_lo", "i_hi"),
    [
        ("pm25", 25, 50, 50, 100),
        ("pm25", 150, 250, 200, 300),
        ("pm10", 350, 420, 200, 300),
        ("o3", 400, 800, 200, 300),
    ],
)
def test_sub_index_interpolates_linearly_inside_a_segment(
    pollutant: str, lo: float, hi: float, i_lo: int, i_hi: int
) -> None:
    mid = (lo + hi) / 2
    assert aqi.sub_index(pollutant, mid) == pytest.approx((i_lo + i_hi) / 2)


def test_o3_eight_hour_table_is_undefined_above_400() -> None:
    assert aqi.sub_index("o3", 120, eight_hour=True) == pytest.approx(100)
    assert aqi.sub_index("o3", 401, eight_hour=True) is None


def test_nowcast_with_steady_values_is_that_value() -> None:
    assert aqi.nowcast([40.0] * 12) == pytest.approx(40.0)


def test_nowcast_weights_recent_hours_when_values_vary() -> None:
    # c1=100, c2=50: w* = 0.5 → w = 0.5; (100 + 0.5·50) / (1 + 0.5) = 83.33
    assert aqi.nowcast([100.0, 50.0]) == pytest.approx(125 / 1.5)
    # w* = 0.8 > 1/2 is used as is: (50 + 0.8·40) / 1.8
    assert aqi.nowcast([50.0, 40.0]) == pytest.approx((50 + 0.8 * 40) / 1.8)


def test_nowcast_skips_missing_hours_but_keeps_their_weight_position() -> None:
    # c1=60, c2 missing, c3=30: w = 0.5; (60 + 0.25·30) / (1 + 0.25)
    assert aqi.nowcast([60.0, None, 30.0]) == pytest.approx((60 + 0.25 * 30) / 1.25)


@pytest.mark.parametrize("hours", [[None, None, 30.0, 40.0], [50.0, None, None, 20.0], [None] * 12, []])
def test_nowcast_needs_two_of_the_latest_three_hours(hours: list[float | None]) -> None:
    assert aqi.nowcast(hours) is None


def test_hourly_aqi_takes_the_largest_sub_index_and_names_it() -> None:
    result = aqi.hourly_aqi({"pm25": [50.0, 50.0, 50.0], "o3": [250.0], "no2": [50.0]})
    assert result is not None
    assert (result.aqi, result.dominant) == (125, "o3")


def test_hourly_aqi_requires_pm() -> None:
    assert aqi.hourly_aqi({"o3": [250.0], "no2": [50.0]}) is None
    assert aqi.hourly_aqi({"pm25": [None, None, 40.0], "o3": [250.0]}) is None


def test_aqi_rounds_half_up() -> None:
    # pm25 = 25.25 → 50.5 → 51 (moderate), not 50 (banker's rounding)
    result = aqi.hourly_aqi({"pm25": [25.25, 25.25]})
    assert result is not None and result.aqi == 51
    assert aqi.band_of(result.aqi).label_vi == "Trung bình"


@pytest.mark.parametrize(
    ("value", "label", "colour"),
    [
        (0, "Tốt", "#00e400"),
        (50, "Tốt", "#00e400"),
        (51, "Trung bình", "#ffff00"),
        (100, "Trung bình", "#ffff00"),
        (101, "Kém", "#ff7e00"),
        (151, "Xấu", "#ff0000"),
        (201, "Rất xấu", "#8f3f97"),
        (301, "Nguy hại", "#7e0023"),
        (500, "Nguy hại", "#7e0023"),
    ],
)
def test_bands_and_colours(value: int, label: str, colour: str) -> None:
    band = aqi.band_of(value)
    assert (band.label_vi, band.colour) == (label, colour)


def test_daily_aqi_pm_from_24_hour_mean_and_gases_from_max_hour() -> None:
    pm = [30.0] * 12 + [70.0] * 12  # mean 50 → 100
    no2 = [50.0] * 23 + [700.0]  # max hour 700 → 150
    result = aqi.daily_aqi({"pm25": pm, "no2": no2})
    assert result is not None and (result.aqi, result.dominant) == (150, "no2")


def test_daily_o3_uses_larger_of_one_hour_and_eight_hour_sub_index() -> None:
    o3 = [170.0] * 24  # 1h: 170 → 57.5; 8h: 170 → 150
    result = aqi.daily_aqi({"pm25": [10.0] * 24, "o3": o3})
    assert result is not None and result.sub_indices["o3"] == 150
