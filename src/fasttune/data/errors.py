"""The one error type for bad data: it names the file, the row and the field, and says what is wrong."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset problem the user can fix.

    `row` is 1-based as the user sees it (the line of a JSONL file, the spreadsheet row of a CSV
    file whose header is row 1, the element of a JSON list). `reason` is a short stable key
    ("not JSON", "missing field", ...) used to count skipped rows.

    >>> str(DataError("empty string", file="data.jsonl", row=17, field="output"))
    "data.jsonl, row 17, field 'output': empty string"
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.row = row
        self.field = field
        self.reason = reason or "bad row"
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.file is not None:
            where.append(str(self.file))
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return f"{', '.join(where)}: {self.message}" if where else self.message

    def at(self, *, file: str | None = None, row: int | None = None) -> DataError:
        """The same error with the file and row filled in where they were unknown."""
        return DataError(
            self.message,
            file=self.file if self.file is not None else file,
            row=self.row if self.row is not None else row,
            field=self.field,
            reason=self.reason,
        )
