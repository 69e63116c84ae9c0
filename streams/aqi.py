"""VN_AQI per Decision 1459/QĐ-TCMT (12 Nov 2019): sub-indices, NowCast for PM, hourly and daily AQI, bands.

Pure functions over hourly mean concentrations (µg/m³, CO included). Rounding: the AQI is rounded
half up to an integer (the decision says "rounded to an integer"; Python's banker's rounding
would turn 50.5 into 50). Concentrations above the top breakpoint are capped at an index of 500.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

INDEX_LEVELS = (0, 50, 100, 150, 200, 300, 400, 500)
#: Pollutant names as they appear in sensor readings, mapped to the breakpoint table's names.
POLLUTANTS = {"pm25": "PM2.5", "pm10": "PM10", "o3": "O3", "no2": "NO2", "so2": "SO2", "co": "CO"}
PM = ("pm25", "pm10")
GASES = ("o3", "no2", "so2", "co")


@cache
def breakpoints() -> dict[tuple[str, str], tuple[tuple[int, float], ...]]:
    """(pollutant, averaging) -> ((index, concentration), ...) for the defined cells of Table 2."""
    text = resources.files("ioc.data").joinpath("vn_aqi_breakpoints.csv").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    table: dict[tuple[str, str], tuple[tuple[int, float], ...]] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        cells = tuple(
            (level, float(row[f"I{level}"])) for level in INDEX_LEVELS if (row.get(f"I{level}") or "").strip()
        )
        table[(row["pollutant"], row["averaging"])] = cells
    return table


def _averaging(pollutant: str, eight_hour: bool = False) -> str:
    if pollutant in PM:
        return "nowcast_or_24h"
    return "8h" if eight_hour else "1h"


def sub_index(pollutant: str, concentration: float, *, eight_hour: bool = False) -> float | None:
    """AQIx = (I[i+1] − I[i]) / (BP[i+1] − BP[i]) × (C − BP[i]) + I[i]; None outside the table's range.

    Above the highest breakpoint the index is capped at 500 for the 1-hour/PM tables; for the
    8-hour O3 table (defined up to 400 µg/m³ only) a higher value is None: the decision says to
    use the 1-hour value instead.
    """
    cells = breakpoints()[(POLLUTANTS[pollutant], _averaging(pollutant, eight_hour))]
    if concentration < 0 or math.isnan(concentration):
        return None
    for (i_lo, bp_lo), (i_hi, bp_hi) in itertools.pairwise(cells):
        if bp_lo <= concentration <= bp_hi:
            return (i_hi - i_lo) / (bp_hi - bp_lo) * (concentration - bp_lo) + i_lo
    return None if eight_hour else 500.0


def nowcast(hourly: Sequence[float | None]) -> float | None:
    """NowCast over ``hourly`` = (c1, c2, ..., c12), c1 the current hour; None where a value is missing.

    w* = Cmin/Cmax over the available hours; w = w* if w* > 1/2 else 1/2;
    NowCast = Σ w^(i−1)·ci / Σ w^(i−1) over the available hours. Valid only when at least two of
    c1, c2, c3 exist; otherwise None.
    """
    hours = list(hourly[:12])
    if sum(1 for c in hours[:3] if c is not None) < 2:
        return None
    present = [(i, c) for i, c in enumerate(hours) if c is not None]
    c_max = max(c for _, c in present)
    c_min = min(c for _, c in present)
    w_star = c_min / c_max if c_max > 0 else 1.0
    w = w_star if w_star > 0.5 else 0.5
    num = sum(w**i * c for i, c in present)
    den = sum(w**i for i, _ in present)
    return num / den


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


@dataclass(frozen=True, slots=True)
class Band:
    low: int
    high: int
    label_vi: str
    label_en: str
    rgb: tuple[int, int, int]
    advice_vi: str
    advice_en: str

    @property
    def colour(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.rgb)


#: Bands and health advice of Decision 1459, Table 4 (advice for the general public, then for sensitive groups).
BANDS = (
    Band(
        0,
        50,
        "Tốt",
        "Good",
        (0, 228, 0),
        "Tự do thực hiện các hoạt động ngoài trời.",
        "Enjoy outdoor activities freely.",
    ),
    Band(
        51,
        100,
        "Trung bình",
        "Moderate",
        (255, 255, 0),
        "Người bình thường tự do hoạt động ngoài trời; nhóm nhạy cảm nên theo dõi triệu chứng như ho, khó thở.",
        "Outdoor activities are fine; sensitive groups should watch for coughing or shortness of breath.",
    ),
    Band(
        101,
        150,
        "Kém",
        "Poor",
        (255, 126, 0),
        "Người có triệu chứng đau mắt, ho, đau họng nên cân nhắc giảm hoạt động ngoài trời; nhóm nhạy cảm nên giảm hoạt động mạnh ngoài trời.",
        "People with sore eyes, cough or sore throat should consider less time outdoors; sensitive groups should reduce strenuous outdoor activity.",
    ),
    Band(
        151,
        200,
        "Xấu",
        "Bad",
        (255, 0, 0),
        "Mọi người nên giảm hoạt động mạnh ngoài trời, tránh tập thể dục kéo dài; nhóm nhạy cảm nên ở trong nhà.",
        "Everyone should reduce strenuous outdoor activity and avoid long exercise; sensitive groups should stay indoors.",
    ),
    Band(
        201,
        300,
        "Rất xấu",
        "Very bad",
        (143, 63, 151),
        "Mọi người hạn chế tối đa hoạt động ngoài trời và chuyển hoạt động vào trong nhà; nhóm nhạy cảm nên ở trong nhà.",
        "Everyone should keep outdoor activity to a minimum and move activities indoors; sensitive groups should stay indoors.",
    ),
    Band(
        301,
        500,
        "Nguy hại",
        "Hazardous",
        (126, 0, 35),
        "Mọi người nên ở trong nhà, đóng cửa ra vào và cửa sổ; nếu phải ra ngoài cần đeo khẩu trang đạt chuẩn.",
        "Everyone should stay indoors with doors and windows closed; wear a proper mask if going out is unavoidable.",
    ),
)


def band_of(aqi: int) -> Band:
    for band in BANDS:
        if aqi <= band.high:
            return band
    return BANDS[-1]


@dataclass(frozen=True, slots=True)
class AqiResult:
    aqi: int
    dominant: str
    sub_indices: Mapping[str, int]

    def describe(self) -> dict[str, object]:
        band = band_of(self.aqi)
        return {
            "dominant": self.dominant,
            "band": band.label_en.lower().replace(" ", "_"),
            "label_vi": band.label_vi,
            "label_en": band.label_en,
            "colour": band.colour,
            "advice_vi": band.advice_vi,
            "advice_en": band.advice_en,
            "sub_indices": dict(self.sub_indices),
        }


def _combine(subs: dict[str, float]) -> AqiResult | None:
    if not any(p in subs for p in PM):
        return None
    rounded = {p: round_half_up(v) for p, v in subs.items()}
    # The dominant pollutant is the one with the largest sub-index; ties go to the contract's order.
    dominant = max(rounded, key=lambda p: (rounded[p], -list(POLLUTANTS).index(p)))
    return AqiResult(rounded[dominant], dominant, rounded)


def hourly_aqi(hourly_means: Mapping[str, Sequence[float | None]]) -> AqiResult | None:
    """Hourly VN_AQI from each pollutant's hourly means, newest first (c1 = current hour).

    Gases use their current 1-hour mean; PM uses NowCast. None when neither PM2.5 nor PM10 has a
    valid NowCast.
    """
    subs: dict[str, float] = {}
    for pollutant, series in hourly_means.items():
        if pollutant not in POLLUTANTS or not series:
            continue
        if pollutant in PM:
            c: float | None = nowcast(series)
        else:
            c = series[0]
        if c is None:
            continue
        s = sub_index(pollutant, c)
        if s is not None:
            subs[pollutant] = s
    return _combine(subs)


def daily_aqi(hourly_means: Mapping[str, Sequence[float | None]]) -> AqiResult | None:
    """Daily VN_AQI from the day's hourly means (in hour order, None for missing hours).

    PM: the 24-hour mean; O3: the larger of the max 1-hour and max 8-hour sub-indices (the
    8-hour value dropped where its concentration exceeds the 8-hour table); SO2, NO2, CO: the
    day's max 1-hour mean.
    """
    subs: dict[str, float] = {}
    for pollutant, series in hourly_means.items():
        values = [c for c in series if c is not None]
        if pollutant not in POLLUTANTS or not values:
            continue
        if pollutant in PM:
            s = sub_index(pollutant, sum(values) / len(values))
        elif pollutant == "o3":
            s = sub_index("o3", max(values))
            means_8h = [
                sum(hours) / 8
                for hours in ([c for c in series[i : i + 8] if c is not None] for i in range(max(len(series) - 7, 0)))
                if len(hours) == 8
            ]
            eight = [x for x in (sub_index("o3", m, eight_hour=True) for m in means_8h) if x is not None]
            if eight:
                s = max(s or 0.0, *eight)
        else:
            s = sub_index(pollutant, max(values))
        if s is not None:
            subs[pollutant] = s
    return _combine(subs)
