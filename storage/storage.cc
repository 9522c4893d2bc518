#include "storage/storage.h"

#include <variant>

namespace modelvault::storage {

void RowSink::Cell(const SqlCell& cell) {
  if (!cell.has_value()) {
    Null();
  } else if (const auto* n = std::get_if<std::int64_t>(&*cell)) {
    Int(*n);
  } else {
    Text(std::get<std::string>(*cell));
  }
}

absl::Status ReadWriteTx::CopyRows(absl::string_view table, absl::string_view columns,
                                   const std::vector<SqlRow>& rows) {
  return CopyRows(table, columns, rows.size(), [&rows](size_t i, RowSink& sink) {
    for (const SqlCell& cell : rows[i]) sink.Cell(cell);
  });
}

}  // namespace modelvault::storage
