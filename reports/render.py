"""A report document as the files people open: JSON, CSV (UTF-8 with BOM), XLSX (openpyxl) and PDF (fpdf2)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reports.labels import t

FORMATS = ("pdf", "xlsx", "csv", "json")
MEDIA_TYPES = {
    "pdf": "application/pdf",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
}
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


def render(doc: dict[str, Any], fmt: str, lang: str = "vi") -> bytes:
    if fmt == "json":
        return json.dumps(doc, ensure_ascii=False, indent=1).encode()
    if fmt == "csv":
        return to_csv(doc, lang)
    if fmt == "xlsx":
        return to_xlsx(doc, lang)
    if fmt == "pdf":
        from reports.pdf import to_pdf

        return to_pdf(doc, lang)
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def _name(item: dict[str, Any], lang: str) -> str:
    return str(item["name_en"] if lang == "en" else item["name_vi"])


def rows(doc: dict[str, Any], lang: str) -> Iterator[list[Any]]:
    """The report as flat rows: section, item, sub-item, value, target, status, previous, change."""
    yield ["section", "item", "detail", "value", "target", "status", "previous", "change", "unit"]
    for i in doc["indicators"]:
        yield [
            "indicator",
            i["kpi"],
            _name(i, lang),
            i["value"],
            i["target"],
            i["status"],
            i["previous"],
            i["change"],
            i["unit"],
        ]
    s = doc["score_766"]
    for g in s["groups"]:
        yield ["766", g["group"], _name(g, lang), g["score"], g["points"], None, None, None, "points"]
    yield [
        "766",
        "total",
        t("total", lang),
        s["total"],
        s["points_scored_of"],
        None,
        s["previous_total"],
        s["change"],
        "points",
    ]
    for g in s["not_scored"]:
        yield ["766_not_scored", g["group"], _name(g, lang), None, g["points"], None, None, None, "points"]
    for kind in ("communes", "agencies"):
        for r in doc["ranking"][kind]:
            yield [f"ranking_{kind}", r["scope"], r["name"], r["percent"], r["rank"], None, None, None, "%"]
    c = doc["cyber"]
    yield ["cyber", "detected", "", c["detected"], None, None, c["previous_detected"], None, "incidents"]
    for sev, n in c["by_severity"].items():
        yield ["cyber", "severity", sev, n, None, None, None, None, "incidents"]
    for cat, n in c["by_category"].items():
        yield ["cyber", "category", cat, n, None, None, None, None, "incidents"]
    yield ["cyber", "mtta_minutes", "", c["mtta_minutes"], None, None, None, None, "min"]
    yield ["cyber", "mttr_minutes", "", c["mttr_minutes"], None, None, None, None, "min"]
    yield ["cyber", "open_at_end", "", c["open_at_end"], None, None, None, None, "incidents"]
    for o in c["past_reporting_deadline"]:
        yield ["cyber_past_deadline", o["incident_id"], f"{o['severity']} {o['category']} {o['system']}", o["days_open"],
               None, None, None, None, "days"]  # fmt: skip
    e = doc["environment"]
    for a in e["air"]:
        for band, n in a["days"].items():
            yield ["aqi_days", a["station"], band, n, None, None, None, None, "days"]
    for w in e["water"]:
        for k in ("bd1", "bd2", "bd3"):
            yield ["flood_hours", w["station"], k, w[k], None, None, None, None, "h"]
    for r in e["rain"]:
        yield ["rain_max_24h", r["station"], r["ending_at"] or "", r["max_24h_mm"], None, None, None, None, "mm"]


def to_csv(doc: dict[str, Any], lang: str) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(["report", doc["period"], doc["scope"], doc["scope_name"], doc["as_of"]])
    for row in rows(doc, lang):
        w.writerow(["" if v is None else v for v in row])
    return ("\ufeff" + buf.getvalue()).encode("utf-8")  # the BOM tells Excel the text is UTF-8


def to_xlsx(doc: dict[str, Any], lang: str) -> bytes:
    from openpyxl import Workbook
    from openpyxl.styles import Font, PatternFill

    wb = Workbook()
    bold = Font(bold=True)
    head_fill = PatternFill("solid", fgColor="DDE6F0")
    fills = {"ok": "C6EFCE", "warn": "FFEB9C", "breach": "FFC7CE"}

    def sheet(title: str, header: list[str], body: list[list[Any]], formats: dict[int, str]) -> None:
        ws = wb.create_sheet(title[:31])
        ws.append(header)
        for cell in ws[1]:
            cell.font, cell.fill = bold, head_fill
        for r in body:
            ws.append(r)
        for col, fmt in formats.items():
            for (cell,) in ws.iter_rows(min_row=2, min_col=col, max_col=col):
                cell.number_format = fmt
        for i, width in enumerate((max(len(str(c.value or "")) for c in column) for column in ws.columns), 1):
            ws.column_dimensions[ws.cell(1, i).column_letter].width = min(max(width + 2, 8), 60)
        ws.freeze_panes = "A2"

    wb.remove(wb.active)
    title = t("title_month" if doc["period_kind"] == "month" else "title_quarter", lang).format(period=doc["period"])
    summary: list[list[Any]] = [
        [title, None],
        [t("scope", lang), f"{doc['scope_name']} ({doc['scope']})"],
        [t("period", lang), f"{doc['start']} – {doc['end']}"],
        [t("as_of", lang), doc["as_of"]],
        [t("source", lang), doc["source"]],
        [t("total", lang), doc["score_766"]["total"]],
    ]
    sheet("Tổng hợp" if lang == "vi" else "Summary", ["", ""], summary, {})
    ind = [
        [i["kpi"], _name(i, lang), i["value"], i["unit"], i["numerator"], i["denominator"], i["target"], i["plan_no"],
         t(i["status"], lang) if i["status"] else None, i["previous"], i["change"]]
        for i in doc["indicators"]
    ]  # fmt: skip
    sheet(
        "Chỉ tiêu" if lang == "vi" else "Indicators",
        ["kpi", t("indicator", lang), t("value", lang), "unit", "numerator", "denominator", t("target", lang),
         "KH 348 #", t("status", lang), t("previous", lang), t("change", lang)],
        ind,
        {3: "#,##0.00", 5: "#,##0", 6: "#,##0", 7: "0.0", 10: "#,##0.00", 11: "+#,##0.00;-#,##0.00;0"},
    )  # fmt: skip
    ws = wb["Chỉ tiêu" if lang == "vi" else "Indicators"]
    for r, i in enumerate(doc["indicators"], 2):
        if i["status"]:
            ws.cell(r, 9).fill = PatternFill("solid", fgColor=fills[i["status"]])
    s = doc["score_766"]
    g_rows = [[g["group"], _name(g, lang), g["points"], g["score"], *[x / 100 if x is not None else None for x in g["rates"][:2]],
               g["formula"]] for g in s["groups"]]  # fmt: skip
    for g in s["groups"]:
        if len(g["rates"]) == 1:
            g_rows[s["groups"].index(g)][5] = None
    g_rows.append(["total", t("total", lang), s["points_scored_of"], s["total"], None, None, ""])
    g_rows += [[g["group"], _name(g, lang), g["points"], None, None, None, g["why_" + lang]] for g in s["not_scored"]]
    sheet("QĐ 766", ["group", t("group", lang), t("points", lang), t("score", lang), t("rate", lang), t("rate", lang) + " 2",
                     "formula"], g_rows, {3: "0", 4: "0.00", 5: "0.00%", 6: "0.00%"})  # fmt: skip
    for kind, title_vi, title_en in (
        ("communes", "Xếp hạng xã", "Communes"),
        ("agencies", "Xếp hạng cơ quan", "Agencies"),
    ):
        body = [[r["rank"], r["scope"], r["name"], r["percent"], r["score"], r["received"], r["on_time_rate"],
                 r["progress_index"]] for r in doc["ranking"][kind]]  # fmt: skip
        sheet(title_en if lang == "en" else title_vi,
              [t("rank", lang), "scope", t("name", lang), t("percent", lang), t("score", lang), t("received", lang),
               t("on_time", lang), "progress %"], body, {4: "0.00", 5: "0.00", 6: "#,##0", 7: "0.00", 8: "0.00"})  # fmt: skip
    c = doc["cyber"]
    cyber = [["detected", c["detected"]], ["previous_detected", c["previous_detected"]],
             *[[f"severity.{k}", v] for k, v in c["by_severity"].items()],
             *[[f"category.{k}", v] for k, v in c["by_category"].items()],
             ["mtta_minutes", c["mtta_minutes"]], ["mttr_minutes", c["mttr_minutes"]], ["open_at_end", c["open_at_end"]],
             ["past_reporting_deadline", len(c["past_reporting_deadline"])]]  # fmt: skip
    sheet(t("sec_cyber", lang)[3:], ["item", t("count", lang)], cyber, {2: "#,##0.0"})
    sheet(
        "Quá hạn báo cáo" if lang == "vi" else "Past deadline",
        ["incident", t("severity", lang), t("category", lang), t("system", lang), t("detected_at", lang), "resolved_at",
         t("days_open", lang)],
        [[o["incident_id"], o["severity"], o["category"], o["system"], o["detected_at"], o["resolved_at"], o["days_open"]]
         for o in c["past_reporting_deadline"]],
        {7: "0.0"},
    )  # fmt: skip
    e = doc["environment"]
    bands = [b["band"] for b in e["aqi_bands"]] + ["no_data"]
    sheet("VN_AQI", [t("station", lang), t("name", lang), *bands],
          [[a["station"], a["name"], *[a["days"][b] for b in bands]] for a in e["air"]], {})  # fmt: skip
    sheet(
        "Mực nước" if lang == "vi" else "Water levels",
        [
            t("station", lang),
            t("name", lang),
            t("river", lang),
            "BĐ I (h)",
            "BĐ II (h)",
            "BĐ III (h)",
            "hours_with_data",
        ],
        [[w["station"], w["name"], w["river"], w["bd1"], w["bd2"], w["bd3"], w["hours_with_data"]] for w in e["water"]],
        {4: "0.0", 5: "0.0", 6: "0.0", 7: "0.0"},
    )
    sheet(
        "Lượng mưa" if lang == "vi" else "Rainfall",
        [t("station", lang), t("name", lang), t("rain_max", lang) + " (mm)", t("ending_at", lang)],
        [[r["station"], r["name"], r["max_24h_mm"], r["ending_at"]] for r in e["rain"]],
        {3: "0.00"},
    )
    out = io.BytesIO()
    wb.save(out)
    return out.getvalue()
