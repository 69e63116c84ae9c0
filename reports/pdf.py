"""The PDF form of a report (fpdf2, DejaVu Sans embedded, so Vietnamese text extracts with its diacritics)."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fpdf import FPDF
from fpdf.enums import XPos, YPos

from reports.labels import t

#: fontTools logs every table it subsets at INFO: a page of noise per PDF.
logging.getLogger("fontTools").setLevel(logging.WARNING)

FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu"))
STATUS_RGB = {"ok": (198, 239, 206), "warn": (255, 235, 156), "breach": (255, 199, 206)}
SEVERITY_RGB = {"low": (120, 170, 220), "medium": (240, 200, 60), "high": (240, 130, 40), "critical": (200, 30, 30)}
HEAD_RGB = (221, 230, 240)


def number(v: float | int | None, lang: str, digits: int = 2) -> str:
    """A figure as a reader of ``lang`` writes it: Vietnamese 1.234,56, English 1,234.56; "–" for none."""
    if v is None:
        return "–"
    text = f"{v:,.0f}" if isinstance(v, int) or digits == 0 else f"{v:,.{digits}f}"
    if lang == "vi":
        text = text.replace(",", "\0").replace(".", ",").replace("\0", ".")
    return text


def _font(name: str) -> Path:
    for d in FONT_DIRS:
        if (d / name).exists():
            return d / name
    raise FileNotFoundError(f"{name} not found (install fonts-dejavu-core)")


class ReportPdf(FPDF):
    def __init__(self, doc: dict[str, Any], lang: str) -> None:
        super().__init__(orientation="P", unit="mm", format="A4")
        self.doc, self.lang = doc, lang
        self.add_font("DejaVu", "", str(_font("DejaVuSans.ttf")))
        self.add_font("DejaVu", "B", str(_font("DejaVuSans-Bold.ttf")))
        self.set_auto_page_break(auto=True, margin=15)
        self.set_margins(15, 12, 15)
        self.set_title(f"{doc['period']} {doc['scope']}")
        self.set_creator("ioc report")
        self.set_creation_date(dt.datetime.fromisoformat(doc["made_for"]))  # the same report, the same bytes

    def footer(self) -> None:
        self.set_y(-11)
        self.set_font("DejaVu", size=7)
        self.set_text_color(110)
        d = self.doc
        self.cell(
            0, 5, f"{d['scope_name']} · {d['period']} · {t('page', self.lang)} {self.page_no()}/{{nb}}", align="C"
        )
        self.set_text_color(0)

    # --- building blocks ---

    def heading(self, text: str) -> None:
        if self.get_y() > 250:
            self.add_page()
        self.ln(3)
        self.set_font("DejaVu", "B", 11)
        self.set_text_color(20, 60, 120)
        self.cell(0, 7, text, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.set_text_color(0)
        self.set_font("DejaVu", size=8.5)

    def row(self, cells: list[str], widths: Sequence[float], *, head: bool = False, fills: dict[int, tuple[int, int, int]] | None = None,
            aligns: str = "") -> None:  # fmt: skip
        if self.get_y() > 275:
            self.add_page()
        self.set_font("DejaVu", "B" if head else "", 8)
        for i, (text, w) in enumerate(zip(cells, widths, strict=True)):
            fill = HEAD_RGB if head else (fills or {}).get(i)
            if fill:
                self.set_fill_color(*fill)
            align = "C" if head else (aligns[i] if i < len(aligns) else "L")
            self.cell(w, 5.5, text, border=1, align=align, fill=bool(fill))
        self.ln(5.5)

    def bars(self, items: list[tuple[str, float | None, float | None]], width: float = 180, scale: float = 100) -> None:
        """Horizontal bars (value, with a target tick), one per item."""
        label_w, bar_w = 62, width - 62 - 18
        self.set_font("DejaVu", size=7.5)
        for label, value, target in items:
            if self.get_y() > 275:  # break before the bar, or it is drawn where the old page ended
                self.add_page()
                self.set_font("DejaVu", size=7.5)
            y = self.get_y()
            self.cell(label_w, 5, label[:48])
            x0 = self.get_x()
            self.set_fill_color(235, 235, 235)
            self.rect(x0, y + 1, bar_w, 3.2, style="F")
            if value is not None:
                ok = target is None or value >= target
                self.set_fill_color(*((60, 150, 80) if ok else (210, 80, 60)))
                self.rect(x0, y + 1, bar_w * min(value, scale) / scale, 3.2, style="F")
            if target is not None:
                self.set_draw_color(20, 20, 20)
                tx = x0 + bar_w * min(target, scale) / scale
                self.line(tx, y + 0.2, tx, y + 4.8)
            self.set_x(x0 + bar_w + 2)
            self.cell(16, 5, number(value, self.lang, 1), align="R", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.set_draw_color(0)


def to_pdf(doc: dict[str, Any], lang: str = "vi") -> bytes:
    pdf = ReportPdf(doc, lang)
    pdf.add_page()
    _cover(pdf, doc, lang)
    _indicators(pdf, doc, lang)
    _score(pdf, doc, lang)
    _ranking(pdf, doc, lang)
    _cyber(pdf, doc, lang)
    _environment(pdf, doc, lang)
    return bytes(pdf.output())


def _cover(pdf: ReportPdf, doc: dict[str, Any], lang: str) -> None:
    pdf.set_font("DejaVu", size=8)
    pdf.cell(0, 5, t("org", lang), align="C", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(2)
    pdf.set_font("DejaVu", "B", 15)
    key = "title_month" if doc["period_kind"] == "month" else "title_quarter"
    pdf.cell(0, 9, t(key, lang).format(period=doc["period"]), align="C", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("DejaVu", "B", 12)
    pdf.cell(0, 7, doc["scope_name"], align="C", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("DejaVu", size=8.5)
    pdf.multi_cell(0, 4.5, t("subtitle", lang), align="C", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(2)
    src = doc["source"]
    source = t("database", lang) if src == "database" else f"{t('events', lang)} {src.partition(':')[2]}"
    for k, v in (
        ("period", f"{doc['start'][:10]} – {doc['end'][:10]} ({doc['period']})"),
        ("as_of", doc["as_of"]),
        ("source", source),
        ("previous", doc["previous_period"]),
    ):
        pdf.cell(45, 5, t(k, lang) + ":")
        pdf.cell(0, 5, v, new_x=XPos.LMARGIN, new_y=YPos.NEXT)


def _indicators(pdf: ReportPdf, doc: dict[str, Any], lang: str) -> None:
    pdf.heading(t("sec_indicators", lang))
    widths = [70, 24, 20, 14, 20, 16, 16]
    pdf.row([t("indicator", lang), t("value", lang), t("target", lang), "KH 348", t("status", lang),
             t("prev_short", lang), t("change", lang)], widths, head=True)  # fmt: skip
    for i in doc["indicators"]:
        unit = "%" if i["unit"] == "%" else (" h" if i["unit"] == "h" else "")
        digits = 0 if i["unit"] == "dossiers" else 2
        value = number(i["value"], lang, digits) + (unit if i["value"] is not None and unit == "%" else "")
        target = (
            ("≥ " if i["direction"] == "at_least" else "≤ ") + number(i["target"], lang, 0) + "%"
            if i["target"] is not None
            else ""
        )
        fills = {4: STATUS_RGB[i["status"]]} if i["status"] else None
        pdf.row(
            [i["name_en"] if lang == "en" else i["name_vi"], value, target, f"#{i['plan_no']}" if i["plan_no"] else "",
             t(i["status"], lang) if i["status"] else "", number(i["previous"], lang, digits),
             ("+" if (i["change"] or 0) > 0 else "") + number(i["change"], lang, digits)],
            widths, fills=fills, aligns="LRRCCRR",
        )  # fmt: skip
    pdf.ln(3)
    pdf.set_font("DejaVu", "B", 8.5)
    pdf.cell(0, 5, t("chart_indicators", lang), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.bars([
        (i["name_en"] if lang == "en" else i["name_vi"], i["value"], i["target"])
        for i in doc["indicators"] if i["unit"] == "%"
    ])  # fmt: skip


def _score(pdf: ReportPdf, doc: dict[str, Any], lang: str) -> None:
    pdf.heading(t("sec_766", lang))
    s = doc["score_766"]
    widths = [44, 14, 14, 28, 80]
    pdf.row([t("group", lang), t("max_short", lang), t("score", lang), t("rate", lang), "Cách tính" if lang == "vi" else "Formula"],
            widths, head=True)  # fmt: skip
    for g in s["groups"]:
        rates = " / ".join(number(r, lang) + "%" for r in g["rates"])
        pdf.row([g["name_en"] if lang == "en" else g["name_vi"], number(g["points"], lang, 0), number(g["score"], lang),
                 rates, g["formula_short_en" if lang == "en" else "formula_short_vi"]], widths, aligns="LRRRL")  # fmt: skip
    pdf.row([t("total_short", lang), number(s["points_scored_of"], lang, 0), number(s["total"], lang),
             f"{number(s['percent_of_scorable'], lang)}%", f"{t('previous', lang)}: {number(s['previous_total'], lang)}"],
            widths, head=True)  # fmt: skip
    pdf.ln(1)
    pdf.set_font("DejaVu", size=7.5)
    for g in s["not_scored"]:
        name = g["name_en"] if lang == "en" else g["name_vi"]
        why = g["why_en"] if lang == "en" else g["why_vi"]
        pdf.multi_cell(0, 4, f"{t('not_scored', lang)}: {name} ({number(g['points'], lang, 0)}) – {why}",
                       new_x=XPos.LMARGIN, new_y=YPos.NEXT)  # fmt: skip
    pdf.ln(1)
    pdf.bars([(g["name_en"] if lang == "en" else g["name_vi"], g["score"], None) for g in s["groups"]],
             scale=max(g["points"] for g in s["groups"]))  # fmt: skip


def _ranking(pdf: ReportPdf, doc: dict[str, Any], lang: str) -> None:
    pdf.heading(t("sec_ranking", lang))
    r = doc["ranking"]
    widths = [14, 70, 22, 22, 26, 26]
    head = [
        t("rank", lang),
        t("name", lang),
        t("percent", lang),
        t("score", lang),
        t("received", lang),
        t("on_time", lang),
    ]

    def line(x: dict[str, Any]) -> list[str]:
        return [str(x["rank"] or "–"), x["name"], number(x["percent"], lang), number(x["score"], lang),
                number(x["received"], lang, 0), number(x["on_time_rate"], lang)]  # fmt: skip

    if r["own"] is not None and r["scope_kind"] != "province":
        pdf.set_font("DejaVu", "B", 8.5)
        n = len(r["communes"] if r["scope_kind"] == "commune" else r["agencies"])
        pdf.cell(0, 5, f"{t('own_rank', lang)}: {r['own']['rank'] or '–'}/{n}", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.row(head, widths, head=True)
        pdf.row(line(r["own"]), widths, aligns="CLRRRR")
    ranked = [x for x in r["communes"] if x["rank"] is not None]
    for title, part in ((t("communes_top", lang), ranked[:10]), (t("communes_bottom", lang), ranked[-10:][::-1])):
        pdf.set_font("DejaVu", "B", 8.5)
        pdf.cell(0, 6, title, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.row(head, widths, head=True)
        for x in part:
            pdf.row(line(x), widths, aligns="CLRRRR")
    agencies = [x for x in r["agencies"] if x["rank"] is not None][:10]
    pdf.set_font("DejaVu", "B", 8.5)
    pdf.cell(0, 6, t("agencies_top", lang), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.row(head, widths, head=True)
    for x in agencies:
        pdf.row(line(x), widths, aligns="CLRRRR")


def _cyber(pdf: ReportPdf, doc: dict[str, Any], lang: str) -> None:
    pdf.heading(t("sec_cyber", lang))
    c = doc["cyber"]
    for k, v in (("detected", c["detected"]), ("mtta", c["mtta_minutes"]), ("mttr", c["mttr_minutes"]),
                 ("open_end", c["open_at_end"]), ("overdue_report", len(c["past_reporting_deadline"]))):  # fmt: skip
        pdf.cell(75, 5, t(k, lang) + ":")
        pdf.cell(0, 5, number(v, lang), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(1)
    if pdf.get_y() + 5.5 * (max(len(c["by_severity"]), len(c["by_category"])) + 1) > 280:
        pdf.add_page()  # the two tables side by side must not break across pages
    y = pdf.get_y()
    pdf.row([t("severity", lang), t("count", lang)], [35, 20], head=True)
    for sev, n in c["by_severity"].items():
        pdf.row([t(sev, lang), number(n, lang)], [35, 20], fills={0: SEVERITY_RGB[sev]}, aligns="LR")
    after_sev = pdf.get_y()
    pdf.set_xy(80, y)
    pdf.set_font("DejaVu", "B", 8)
    pdf.set_fill_color(*HEAD_RGB)
    pdf.cell(40, 5.5, t("category", lang), border=1, fill=True, align="C")
    pdf.cell(20, 5.5, t("count", lang), border=1, fill=True, align="C", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("DejaVu", size=8)
    total = max(c["by_category"].values(), default=0)
    for cat, n in c["by_category"].items():
        pdf.set_x(80)
        pdf.cell(40, 5.5, cat, border=1)
        pdf.cell(20, 5.5, number(n, lang), border=1, align="R")
        if total:
            pdf.set_fill_color(90, 120, 180)
            pdf.rect(pdf.get_x() + 2, pdf.get_y() + 1.2, 50 * n / total, 3.2, style="F")
        pdf.ln(5.5)
    pdf.set_y(max(after_sev, pdf.get_y()) + 2)
    pdf.set_font("DejaVu", "B", 8.5)
    pdf.cell(0, 6, t("overdue_report", lang), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    widths = [34, 20, 24, 56, 34, 12]
    items = c["past_reporting_deadline"]
    if not items:
        pdf.set_font("DejaVu", size=8)
        pdf.cell(0, 5, t("none", lang), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        return
    pdf.row(["ID", t("severity", lang), t("category", lang), t("system", lang), t("detected_at", lang), t("days_open", lang)],
            widths, head=True)  # fmt: skip
    for o in items[:25]:
        pdf.row([o["incident_id"][:22], t(o["severity"], lang) if o["severity"] else "", o["category"] or "",
                 (o["system"] or "")[:36], o["detected_at"][:16].replace("T", " "), number(o["days_open"], lang, 1)],
                widths, aligns="LLLLLR")  # fmt: skip
    if len(items) > 25:
        pdf.cell(0, 5, f"… +{len(items) - 25} (XLSX)", new_x=XPos.LMARGIN, new_y=YPos.NEXT)


def _environment(pdf: ReportPdf, doc: dict[str, Any], lang: str) -> None:
    pdf.heading(t("sec_env", lang))
    e = doc["environment"]
    bands = e["aqi_bands"]
    pdf.set_font("DejaVu", "B", 8.5)
    pdf.cell(0, 6, t("aqi_days", lang), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    # legend
    pdf.set_font("DejaVu", size=6.5)
    for b in bands:
        pdf.set_fill_color(*_rgb(b["colour"]))
        pdf.rect(pdf.get_x(), pdf.get_y() + 1, 3, 3, style="DF")
        pdf.set_x(pdf.get_x() + 4)
        pdf.cell(26, 5, f"{b['label_en'] if lang == 'en' else b['label_vi']} {b['low']}–{b['high']}")
    pdf.ln(6)
    n_days = max((sum(a["days"].values()) for a in e["air"]), default=0)
    for a in e["air"]:
        if pdf.get_y() > 275:
            pdf.add_page()
        y = pdf.get_y()
        pdf.set_font("DejaVu", size=7)
        pdf.cell(58, 5, (a["name"] or a["station"])[:44])
        x = pdf.get_x()
        for b in bands:
            n = a["days"][b["band"]]
            if n:
                w = 90 * n / n_days
                pdf.set_fill_color(*_rgb(b["colour"]))
                pdf.rect(x, y + 0.8, w, 3.6, style="F")
                x += w
        if a["days"]["no_data"]:
            w = 90 * a["days"]["no_data"] / n_days
            pdf.set_fill_color(200, 200, 200)
            pdf.rect(x, y + 0.8, w, 3.6, style="F")
        pdf.set_x(pdf.get_x() + 92)
        counts = " ".join(str(a["days"][b["band"]]) for b in bands) + f" · {t('no_data', lang)} {a['days']['no_data']}"
        pdf.cell(0, 5, counts, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(2)
    pdf.set_font("DejaVu", "B", 8.5)
    pdf.cell(0, 6, t("flood_hours", lang), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    widths = [62, 22, 24, 24, 24, 24]
    pdf.row([t("station", lang), t("river", lang), "BĐ I (h)", "BĐ II (h)", "BĐ III (h)", "h data"], widths, head=True)
    for w in e["water"]:
        pdf.row([(w["name"] or w["station"])[:40], w["river"], number(w["bd1"], lang, 1), number(w["bd2"], lang, 1),
                 number(w["bd3"], lang, 1), number(w["hours_with_data"], lang, 1)], widths, aligns="LLRRRR")  # fmt: skip
    pdf.ln(2)
    top = e["max_rain_24h"]
    pdf.set_font("DejaVu", "B", 8.5)
    text = t("rain_max", lang) + ": "
    if top is None:
        text += t("none", lang)
    else:
        text += f"{number(top['max_24h_mm'], lang)} mm – {top['name'] or top['station']} ({t('ending_at', lang).lower()} {top['ending_at'] or '–'})"
    pdf.multi_cell(0, 5, text, align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    rain = sorted((r for r in e["rain"] if r["max_24h_mm"] is not None), key=lambda r: -r["max_24h_mm"])[:15]
    if rain:
        pdf.bars([((r["name"] or r["station"]), r["max_24h_mm"], None) for r in rain],
                 scale=max(r["max_24h_mm"] for r in rain) or 1)  # fmt: skip


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)
