#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "google/protobuf/message.h"
#include "storage/filter.h"
#include "storage/schema.h"

// The storage interface of modelvault, split by role as in SpiceDB: a Reader,
// a ReadWriteTx that adds writes, and a Datastore that runs transactions.
// Every method returns absl::Status; driver exceptions never cross it. Error
// codes: NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION (a constraint such as
// a dependent row), ABORTED (retry the transaction), UNAVAILABLE (the database
// is unreachable; retry the call), INTERNAL (messages never carry SQL).
namespace modelvault::storage {

// A stored resource with its storage revision (the source of its etag).
struct StoredResource {
  std::unique_ptr<google::protobuf::Message> message;  // null for keys-only lists
  std::int64_t revision = 0;
  std::string name;  // set by keys-only lists
};

struct ListQuery {
  // Only children of this parent; nullopt for every parent.
  std::optional<std::string> parent;
  // AIP-160 filter text, compiled against the schema's filterable fields.
  std::string filter;
  // Sort order; ParseOrderBy's result (always ends with the name key).
  std::vector<OrderTerm> order;
  // Keyset position: the sort key of the last row of the previous page, as
  // returned in ListResult::last_key. Empty for the first page.
  std::vector<SqlValue> after;
  // Rows to return.
  int limit = 50;
  // Return only name and revision of each row (bodies come from a cache).
  bool keys_only = false;
};

struct ListResult {
  std::vector<StoredResource> items;
  // Sort key of the last item, for the next page's ListQuery::after.
  std::vector<SqlValue> last_key;
  // Whether rows follow the last item.
  bool more = false;
};

// One row of the change feed (transactional outbox).
struct ChangeRecord {
  std::int64_t seq = 0;  // assigned on append; commit order
  absl::Time time;
  std::string resource_type;  // schema type, e.g. "modelvault.dev/Model"
  std::string resource_name;
  std::string change_type;  // "CREATED", "UPDATED" or "DELETED"
  std::string principal;
  std::string request_id;
  std::string resource_json;  // the resource after the change (before, for deletes)
  // The decoded event, for feeds whose events are messages (usage records).
  std::shared_ptr<const google::protobuf::Message> message;
};

// The stored outcome of a mutation carrying a request_id (AIP-155).
struct IdempotencyRecord {
  std::string request_id;
  std::string method;
  std::string request_hash;
  std::string response;  // serialized response message
};

// A parameter or result cell of a hand-written statement; nullopt is NULL.
using SqlCell = std::optional<SqlValue>;
// The type a result column is read as.
enum class SqlType { kInt64, kText };
using SqlRow = std::vector<SqlCell>;

// Cell accessors: the value, or `fallback` when NULL or of the other type.
std::int64_t CellInt(const SqlCell& cell, std::int64_t fallback = 0);
std::string CellText(const SqlCell& cell);

class Reader {
 public:
  virtual ~Reader() = default;

  // Runs a hand-written SELECT (the behaviour that is not plain CRUD: key
  // acquisition, counters, hashes). Parameters are named :p0, :p1, ... in
  // the order of `params`; `columns` gives each result column's type.
  virtual absl::StatusOr<std::vector<SqlRow>> Query(absl::string_view sql,
                                                    const std::vector<SqlCell>& params,
                                                    const std::vector<SqlType>& columns) = 0;

  virtual absl::StatusOr<StoredResource> Get(const ResourceSchema& schema,
                                             absl::string_view name) = 0;
  virtual absl::StatusOr<ListResult> List(const ResourceSchema& schema, const ListQuery& query) = 0;
  // Rows of `schema` whose `column` equals `value` (dependency checks).
  virtual absl::StatusOr<std::int64_t> CountWhere(const ResourceSchema& schema,
                                                  absl::string_view column,
                                                  absl::string_view value) = 0;
  // Change records with seq > after_seq, in seq order.
  virtual absl::StatusOr<std::vector<ChangeRecord>> ReadChanges(std::int64_t after_seq,
                                                                int limit) = 0;
  // Highest committed seq (0 when the feed is empty).
  virtual absl::StatusOr<std::int64_t> LastChangeSeq() = 0;
  // Lowest seq still retained (0 when the feed is empty).
  virtual absl::StatusOr<std::int64_t> FirstChangeSeq() = 0;
  virtual absl::StatusOr<std::optional<IdempotencyRecord>> FindRequest(
      absl::string_view request_id) = 0;
};

// Receives the cells of one row of ReadWriteTx::CopyRows, in column order.
class RowSink {
 public:
  virtual ~RowSink() = default;
  virtual void Int(std::int64_t value) = 0;
  virtual void Text(absl::string_view value) = 0;
  virtual void Null() = 0;
  // One cell.
  void Cell(const SqlCell& cell);
};

class ReadWriteTx : public Reader {
 public:
  // Inserts a new resource at revision 1. ALREADY_EXISTS when the name exists.
  virtual absl::Status Insert(const ResourceSchema& schema,
                              const google::protobuf::Message& resource) = 0;
  // Replaces a resource if its revision is still `expected_revision`, and
  // bumps the revision. NOT_FOUND or ABORTED otherwise.
  virtual absl::Status Update(const ResourceSchema& schema,
                              const google::protobuf::Message& resource,
                              std::int64_t expected_revision) = 0;
  // Deletes a resource at `expected_revision`. NOT_FOUND, ABORTED, or
  // FAILED_PRECONDITION when other rows still refer to it.
  virtual absl::Status Delete(const ResourceSchema& schema, absl::string_view name,
                              std::int64_t expected_revision) = 0;
  // Reads a resource and locks it until the transaction ends.
  virtual absl::StatusOr<StoredResource> GetForUpdate(const ResourceSchema& schema,
                                                      absl::string_view name) = 0;
  // Appends to the change feed; fills record.seq. Records commit in seq order.
  virtual absl::Status AppendChange(ChangeRecord& record) = 0;
  virtual absl::Status SaveRequest(const IdempotencyRecord& record) = 0;
  // Runs a hand-written INSERT/UPDATE/DELETE (parameters as in Query);
  // returns the number of rows affected.
  virtual absl::StatusOr<std::int64_t> Exec(absl::string_view sql,
                                            const std::vector<SqlCell>& params) = 0;
  // Inserts `count` rows into `table`, in bulk: `columns` names them
  // ("a, b"), and `fill(i, sink)` writes row i's cells, one per column, in
  // order (straight from the caller's data: no cells are built). COPY on
  // PostgreSQL, one prepared statement reused for every row on SQLite.
  // ALREADY_EXISTS on a duplicate key.
  virtual absl::Status CopyRows(absl::string_view table, absl::string_view columns, size_t count,
                                absl::FunctionRef<void(size_t, RowSink&)> fill) = 0;
  // The same for rows of cells, one per column.
  absl::Status CopyRows(absl::string_view table, absl::string_view columns,
                        const std::vector<SqlRow>& rows);
};

// Capabilities that differ between engines (named so tests can skip by name).
struct Features {
  bool concurrent_writers = false;  // writers run in parallel (PostgreSQL)
  bool advisory_locks = false;
};

struct DatastoreOptions {
  int pool_size = 8;
  // How long a call waits for a pooled connection before UNAVAILABLE.
  absl::Duration acquire_timeout = absl::Seconds(5);
  // Times a transaction is retried after a serialization failure or deadlock.
  int max_retries = 5;
};

class Datastore {
 public:
  virtual ~Datastore() = default;

  // Runs `fn` in a read-write transaction: commits when it returns OK, rolls
  // back otherwise. Retries the whole function on ABORTED conflicts, so `fn`
  // must not have side effects outside the transaction.
  virtual absl::Status ReadWriteTx(absl::FunctionRef<absl::Status(ReadWriteTx&)> fn) = 0;
  // Runs `fn` on a consistent read-only view.
  virtual absl::Status Read(absl::FunctionRef<absl::Status(Reader&)> fn) = 0;
  // Checks that the database answers.
  virtual absl::Status Ping() = 0;
  // Returns a secret stored in the database, creating it with `generate()`
  // on first use (shared by every replica, e.g. the page-token key).
  virtual absl::StatusOr<std::string> GetOrCreateSecret(
      absl::string_view name, absl::FunctionRef<std::string()> generate) = 0;
  virtual Features features() const = 0;
  virtual absl::string_view engine() const = 0;  // "postgresql" or "sqlite3"
};

// Opens a datastore from a URL: `sqlite3://db=PATH` or
// `postgresql://host=... port=... dbname=... user=...`. Does not migrate.
absl::StatusOr<std::unique_ptr<Datastore>> OpenDatastore(absl::string_view url,
                                                         const DatastoreOptions& options = {});

}  // namespace modelvault::storage
