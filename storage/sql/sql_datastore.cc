// The one SQL implementation of storage.h, over SOCI, for every engine; the
// differences live in the Dialect.
#include <chrono>
#include <deque>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "soci/postgresql/soci-postgresql.h"
#include "soci/sqlite3/soci-sqlite3.h"
#include "storage/sql/dialect.h"
#include "storage/sql/row_codec.h"
#include "storage/sql/session_pool.h"
#include "storage/storage.h"

namespace modelvault::storage {
namespace {

using google::protobuf::Message;

// Prepares `sql` with `params` (and `row` as the into() targets) and runs it;
// true when a row was fetched.
bool RunStatement(soci::statement& statement, const std::string& sql, Params& params,
                  RowBuffer* row) {
  if (row != nullptr) row->BindTo(statement);
  params.BindTo(statement);
  statement.alloc();
  statement.prepare(sql);
  statement.define_and_bind();
  return statement.execute(true);
}

// Runs a statement with named parameters; returns the affected row count.
std::int64_t Execute(soci::session& session, const std::string& sql, Params& params) {
  soci::statement statement(session);
  RunStatement(statement, sql, params, nullptr);
  return statement.get_affected_rows();
}

Params BindCells(const std::vector<SqlCell>& cells) {
  Params params;
  for (size_t i = 0; i < cells.size(); ++i) {
    std::string name = absl::StrCat("p", i);
    if (!cells[i].has_value()) {
      params.AddString(std::move(name), "", /*null=*/true);
    } else {
      params.Add(std::move(name), *cells[i]);
    }
  }
  return params;
}

class SqlTx final : public ReadWriteTx {
 public:
  SqlTx(soci::session& session, const Dialect& dialect) : session_(session), dialect_(dialect) {}

  // Whether the last failure was a conflict worth retrying the transaction.
  bool retryable() const { return retryable_; }

  absl::StatusOr<StoredResource> Get(const ResourceSchema& schema,
                                     absl::string_view name) override {
    return GetImpl(schema, name, "");
  }

  absl::StatusOr<StoredResource> GetForUpdate(const ResourceSchema& schema,
                                              absl::string_view name) override {
    return GetImpl(schema, name, dialect_.ForUpdate());
  }

  absl::StatusOr<ListResult> List(const ResourceSchema& schema, const ListQuery& query) override {
    absl::StatusOr<CompiledFilter> filter = CompileFilter(query.filter, schema.filter_schema());
    if (!filter.ok()) return filter.status();
    Params params;
    std::vector<std::string> where;
    if (query.parent.has_value()) {
      where.emplace_back("parent = :parent");
      params.AddString("parent", *query.parent);
    }
    if (!filter->sql.empty()) {
      where.push_back(filter->sql);
      for (size_t i = 0; i < filter->params.size(); ++i) {
        params.Add(absl::StrCat("f", i), filter->params[i]);
      }
    }
    if (!query.after.empty()) {
      if (query.after.size() != query.order.size()) {
        return absl::InvalidArgumentError("page position does not match the order");
      }
      where.push_back(KeysetCondition(query.order));
      for (size_t i = 0; i < query.after.size(); ++i) {
        params.Add(absl::StrCat("k", i), query.after[i]);
      }
    }
    std::vector<std::string> order;
    for (const OrderTerm& term : query.order) {
      order.push_back(absl::StrCat(SortExpression(term.column), term.descending ? " DESC" : ""));
    }
    std::string select = SelectList(schema);
    if (query.keys_only) {
      select = "name, revision";
      for (const OrderTerm& term : query.order) {
        absl::StrAppend(&select, ", ", SortExpression(term.column));
      }
    }
    std::string sql = absl::StrCat("SELECT ", select, " FROM ", schema.table());
    if (!where.empty()) absl::StrAppend(&sql, " WHERE ", absl::StrJoin(where, " AND "));
    absl::StrAppend(&sql, " ORDER BY ", absl::StrJoin(order, ", "), " LIMIT :lim");
    params.AddInt("lim", query.limit + 1);  // one extra row tells whether more follow

    if (query.keys_only) return ListKeys(sql, params, query);
    return Guard<ListResult>([&]() -> absl::StatusOr<ListResult> {
      ListResult result;
      RowBuffer row(schema);
      soci::statement statement(session_);
      bool have = RunStatement(statement, sql, params, &row);
      while (have) {
        if (static_cast<int>(result.items.size()) == query.limit) {
          result.more = true;
          break;
        }
        StoredResource item{std::unique_ptr<Message>(NewMessage(schema)), 0, {}};
        if (absl::Status s = row.Decode(*item.message, item.revision); !s.ok()) return s;
        result.items.push_back(std::move(item));
        have = statement.fetch();
      }
      if (!result.items.empty()) {
        result.last_key = SortKeyOf(*result.items.back().message, query.order);
      }
      return result;
    });
  }

  absl::StatusOr<std::int64_t> CountWhere(const ResourceSchema& schema, absl::string_view column,
                                          absl::string_view value) override {
    if (column != "parent" && column != "name" && schema.FindColumn(column) == nullptr) {
      return absl::InternalError("unknown column");
    }
    return Guard<std::int64_t>([&]() -> absl::StatusOr<std::int64_t> {
      long long count = 0;  // NOLINT(google-runtime-int)
      std::string v(value);
      session_ << absl::StrCat("SELECT COUNT(*) FROM ", schema.table(), " WHERE ", column, " = :v"),
          soci::use(v), soci::into(count);
      return count;
    });
  }

  absl::StatusOr<std::vector<ChangeRecord>> ReadChanges(std::int64_t after_seq,
                                                        int limit) override {
    return Guard<std::vector<ChangeRecord>>([&]() -> absl::StatusOr<std::vector<ChangeRecord>> {
      std::vector<ChangeRecord> out;
      // SOCI binds long long.
      long long seq = 0;            // NOLINT(google-runtime-int)
      long long micros = 0;         // NOLINT(google-runtime-int)
      long long after = after_seq;  // NOLINT(google-runtime-int)
      long long lim = limit;        // NOLINT(google-runtime-int)
      ChangeRecord r;
      soci::statement statement =
          (session_.prepare << "SELECT seq, change_time, resource_type, resource_name, "
                               "change_type, principal, request_id, resource FROM changes "
                               "WHERE seq > :after ORDER BY seq LIMIT :lim",
           soci::into(seq), soci::into(micros), soci::into(r.resource_type),
           soci::into(r.resource_name), soci::into(r.change_type), soci::into(r.principal),
           soci::into(r.request_id), soci::into(r.resource_json), soci::use(after), soci::use(lim));
      statement.execute();
      while (statement.fetch()) {
        r.seq = seq;
        r.time = absl::FromUnixMicros(micros);
        out.push_back(r);
      }
      return out;
    });
  }

  absl::StatusOr<std::int64_t> LastChangeSeq() override {
    return ScalarSeq("SELECT COALESCE(MAX(seq), 0) FROM changes");
  }
  absl::StatusOr<std::int64_t> FirstChangeSeq() override {
    return ScalarSeq("SELECT COALESCE(MIN(seq), 0) FROM changes");
  }

  absl::StatusOr<std::optional<IdempotencyRecord>> FindRequest(
      absl::string_view request_id) override {
    return Guard<std::optional<IdempotencyRecord>>(
        [&]() -> absl::StatusOr<std::optional<IdempotencyRecord>> {
          IdempotencyRecord r;
          r.request_id = std::string(request_id);
          dialect_.LockRequestId(session_, r.request_id);
          soci::indicator ind = soci::i_null;
          session_ << "SELECT method, request_hash, response FROM request_ids "
                      "WHERE request_id = :id",
              soci::into(r.method, ind), soci::into(r.request_hash), soci::into(r.response),
              soci::use(r.request_id);
          if (!session_.got_data()) return std::optional<IdempotencyRecord>();
          return std::optional<IdempotencyRecord>(std::move(r));
        });
  }

  absl::Status Insert(const ResourceSchema& schema, const Message& resource) override {
    Params params;
    if (absl::Status s = KeyParams(schema, resource, params); !s.ok()) return s;
    if (absl::Status s = EncodeColumns(schema, resource, params); !s.ok()) return s;
    std::vector<std::string> cols = {"name", "parent", "revision"};
    std::vector<std::string> vals = {":name", ":parent", "1"};
    for (const Column& c : schema.columns()) {
      cols.push_back(c.name);
      vals.push_back(":c_" + c.name);
    }
    const std::string sql =
        absl::StrCat("INSERT INTO ", schema.table(), " (", absl::StrJoin(cols, ", "), ") VALUES (",
                     absl::StrJoin(vals, ", "), ")");
    return Guard<bool>([&]() -> absl::StatusOr<bool> {
             Execute(session_, sql, params);
             return true;
           })
        .status();
  }

  absl::Status Update(const ResourceSchema& schema, const Message& resource,
                      std::int64_t expected_revision) override {
    Params params;
    if (absl::Status s = KeyParams(schema, resource, params); !s.ok()) return s;
    if (absl::Status s = EncodeColumns(schema, resource, params); !s.ok()) return s;
    params.AddInt("rev", expected_revision);
    std::vector<std::string> sets = {"revision = revision + 1"};
    for (const Column& c : schema.columns()) sets.push_back(absl::StrCat(c.name, " = :c_", c.name));
    const std::string sql =
        absl::StrCat("UPDATE ", schema.table(), " SET ", absl::StrJoin(sets, ", "),
                     " WHERE name = :name AND parent = :parent AND revision = :rev");
    return AffectOne(schema, ResourceName(resource), sql, params);
  }

  absl::Status Delete(const ResourceSchema& schema, absl::string_view name,
                      std::int64_t expected_revision) override {
    Params params;
    params.AddString("name", std::string(name));
    params.AddInt("rev", expected_revision);
    const std::string sql =
        absl::StrCat("DELETE FROM ", schema.table(), " WHERE name = :name AND revision = :rev");
    return AffectOne(schema, name, sql, params);
  }

  absl::Status AppendChange(ChangeRecord& record) override {
    return Guard<bool>([&]() -> absl::StatusOr<bool> {
             dialect_.LockChangeFeed(session_);
             long long seq = 0;                                   // NOLINT(google-runtime-int)
             long long micros = absl::ToUnixMicros(record.time);  // NOLINT(google-runtime-int)
             session_ << "INSERT INTO changes (change_time, resource_type, resource_name, "
                         "change_type, principal, request_id, resource) VALUES (:t, :rt, :rn, "
                         ":ct, :p, :rid, :res) RETURNING seq",
                 soci::use(micros), soci::use(record.resource_type),
                 soci::use(record.resource_name), soci::use(record.change_type),
                 soci::use(record.principal), soci::use(record.request_id),
                 soci::use(record.resource_json), soci::into(seq);
             record.seq = seq;
             return true;
           })
        .status();
  }

  absl::Status SaveRequest(const IdempotencyRecord& record) override {
    absl::Status status =
        Guard<bool>([&]() -> absl::StatusOr<bool> {
          long long now = absl::ToUnixMicros(absl::Now());  // NOLINT(google-runtime-int)
          session_ << "INSERT INTO request_ids (request_id, method, request_hash, response, "
                      "create_time) VALUES (:id, :m, :h, :r, :t)",
              soci::use(record.request_id), soci::use(record.method),
              soci::use(record.request_hash), soci::use(record.response), soci::use(now);
          return true;
        }).status();
    // A concurrent transaction with the same request_id won: retrying this
    // one replays its stored result.
    if (absl::IsAlreadyExists(status)) {
      retryable_ = true;
      return absl::AbortedError("a concurrent call with the same request_id finished first");
    }
    return status;
  }

  // Runs `body`, turning driver exceptions into statuses.
  template <typename T, typename F>
  absl::StatusOr<T> Guard(F&& body) {
    try {
      return body();
    } catch (const soci::soci_error& error) {
      absl::Status status = dialect_.MapError(error);
      if (absl::IsAborted(status)) retryable_ = true;
      if (absl::IsUnavailable(status)) broken_ = true;
      return status;
    } catch (const std::exception& error) {
      return absl::InternalError("unexpected storage failure");
    }
  }

  absl::StatusOr<std::vector<SqlRow>> Query(absl::string_view sql,
                                            const std::vector<SqlCell>& params,
                                            const std::vector<SqlType>& columns) override {
    return Guard<std::vector<SqlRow>>([&]() -> absl::StatusOr<std::vector<SqlRow>> {
      Params bound = BindCells(params);
      struct Target {
        std::string text;
        long long number = 0;  // NOLINT(google-runtime-int): SOCI's 64-bit type
        soci::indicator indicator = soci::i_ok;
      };
      std::deque<Target> targets(columns.size());
      soci::statement statement(session_);
      for (size_t i = 0; i < columns.size(); ++i) {
        if (columns[i] == SqlType::kInt64) {
          statement.exchange(soci::into(targets[i].number, targets[i].indicator));
        } else {
          statement.exchange(soci::into(targets[i].text, targets[i].indicator));
        }
      }
      std::vector<SqlRow> rows;
      bool have = RunStatement(statement, std::string(sql), bound, nullptr);
      while (have) {
        SqlRow row(columns.size());
        for (size_t i = 0; i < columns.size(); ++i) {
          if (targets[i].indicator == soci::i_null) continue;
          if (columns[i] == SqlType::kInt64) {
            row[i] = static_cast<std::int64_t>(targets[i].number);
          } else {
            row[i] = targets[i].text;
          }
        }
        rows.push_back(std::move(row));
        have = statement.fetch();
      }
      return rows;
    });
  }

  absl::StatusOr<std::int64_t> Exec(absl::string_view sql,
                                    const std::vector<SqlCell>& params) override {
    return Guard<std::int64_t>([&]() -> absl::StatusOr<std::int64_t> {
      Params bound = BindCells(params);
      return Execute(session_, std::string(sql), bound);
    });
  }

  using ReadWriteTx::CopyRows;
  absl::Status CopyRows(absl::string_view table, absl::string_view columns, size_t count,
                        absl::FunctionRef<void(size_t, RowSink&)> fill) override {
    if (count == 0) return absl::OkStatus();
    return Guard<bool>([&]() -> absl::StatusOr<bool> {
             dialect_.CopyRows(session_, table, columns, count, fill);
             return true;
           })
        .status();
  }

  bool broken() const { return broken_; }

  absl::Status Ping() {
    return Guard<bool>([&]() -> absl::StatusOr<bool> {
             int one = 0;
             session_ << "SELECT 1", soci::into(one);
             return one == 1;
           })
        .status();
  }

  // Inserts `fresh` unless a value exists, then returns the stored value.
  absl::StatusOr<std::string> GetOrCreateSecret(const std::string& name, const std::string& fresh) {
    return Guard<std::string>([&]() -> absl::StatusOr<std::string> {
      long long now = absl::ToUnixMicros(absl::Now());  // NOLINT(google-runtime-int)
      session_ << "INSERT INTO server_secrets (name, value, create_time) VALUES (:n, :v, :t) "
                  "ON CONFLICT (name) DO NOTHING",
          soci::use(name), soci::use(fresh), soci::use(now);
      std::string value;
      session_ << "SELECT value FROM server_secrets WHERE name = :n", soci::use(name),
          soci::into(value);
      return value;
    });
  }

 private:
  static Message* NewMessage(const ResourceSchema& schema) {
    return google::protobuf::MessageFactory::generated_factory()
        ->GetPrototype(schema.descriptor())
        ->New();
  }

  static absl::Status KeyParams(const ResourceSchema& schema, const Message& resource,
                                Params& params) {
    std::string name = ResourceName(resource);
    absl::StatusOr<std::string> parent = schema.ParentOf(name);
    if (!parent.ok()) return parent.status();
    params.AddString("name", std::move(name));
    params.AddString("parent", *std::move(parent));
    return absl::OkStatus();
  }

  // Runs a keys-only List: name, revision and the sort key of each row.
  absl::StatusOr<ListResult> ListKeys(const std::string& sql, Params& params,
                                      const ListQuery& query) {
    return Guard<ListResult>([&]() -> absl::StatusOr<ListResult> {
      struct Cell {
        bool is_text = false;
        std::string text;
        long long number = 0;  // NOLINT(google-runtime-int)
        soci::indicator indicator = soci::i_ok;
      };
      std::string name;
      long long revision = 0;  // NOLINT(google-runtime-int)
      std::deque<Cell> cells(query.order.size());
      soci::statement statement(session_);
      statement.exchange(soci::into(name));
      statement.exchange(soci::into(revision));
      for (size_t i = 0; i < cells.size(); ++i) {
        const Column* c = query.order[i].column;
        cells[i].is_text = c == nullptr || c->kind == ColumnKind::kString ||
                           c->kind == ColumnKind::kEnum || c->kind == ColumnKind::kJson;
        if (cells[i].is_text) {
          statement.exchange(soci::into(cells[i].text, cells[i].indicator));
        } else {
          statement.exchange(soci::into(cells[i].number, cells[i].indicator));
        }
      }
      ListResult result;
      bool have = RunStatement(statement, sql, params, nullptr);
      while (have) {
        if (static_cast<int>(result.items.size()) == query.limit) {
          result.more = true;
          break;
        }
        result.items.push_back(StoredResource{nullptr, revision, name});
        result.last_key.clear();
        for (const Cell& cell : cells) {
          if (cell.is_text) {
            result.last_key.emplace_back(cell.text);
          } else {
            result.last_key.emplace_back(std::int64_t{cell.number});
          }
        }
        have = statement.fetch();
      }
      return result;
    });
  }

  // (k0 > a) OR (k0 = a AND k1 > b) OR ..., with < for descending terms.
  static std::string KeysetCondition(const std::vector<OrderTerm>& order) {
    std::vector<std::string> alternatives;
    for (size_t i = 0; i < order.size(); ++i) {
      std::vector<std::string> parts;
      for (size_t j = 0; j < i; ++j) {
        parts.push_back(absl::StrCat(SortExpression(order[j].column), " = :k", j));
      }
      parts.push_back(absl::StrCat(SortExpression(order[i].column),
                                   order[i].descending ? " < :k" : " > :k", i));
      alternatives.push_back(absl::StrCat("(", absl::StrJoin(parts, " AND "), ")"));
    }
    return absl::StrCat("(", absl::StrJoin(alternatives, " OR "), ")");
  }

  absl::StatusOr<StoredResource> GetImpl(const ResourceSchema& schema, absl::string_view name,
                                         absl::string_view suffix) {
    const std::string sql = absl::StrCat("SELECT ", SelectList(schema), " FROM ", schema.table(),
                                         " WHERE name = :name", suffix);
    return Guard<StoredResource>([&]() -> absl::StatusOr<StoredResource> {
      Params params;
      params.AddString("name", std::string(name));
      RowBuffer row(schema);
      soci::statement statement(session_);
      if (!RunStatement(statement, sql, params, &row)) {
        return absl::NotFoundError(absl::StrCat(name, " does not exist"));
      }
      StoredResource out{std::unique_ptr<Message>(NewMessage(schema)), 0, {}};
      if (absl::Status s = row.Decode(*out.message, out.revision); !s.ok()) return s;
      return out;
    });
  }

  absl::Status AffectOne(const ResourceSchema& schema, absl::string_view name,
                         const std::string& sql, Params& params) {
    absl::StatusOr<std::int64_t> affected = Guard<std::int64_t>(
        [&]() -> absl::StatusOr<std::int64_t> { return Execute(session_, sql, params); });
    if (!affected.ok()) return affected.status();
    if (*affected == 1) return absl::OkStatus();
    absl::StatusOr<std::int64_t> exists = CountWhere(schema, "name", name);
    if (!exists.ok()) return exists.status();
    if (*exists == 0) return absl::NotFoundError(absl::StrCat(name, " does not exist"));
    return absl::AbortedError(absl::StrCat(name, " was changed concurrently (etag mismatch)"));
  }

  absl::StatusOr<std::int64_t> ScalarSeq(const char* sql) {
    return Guard<std::int64_t>([&]() -> absl::StatusOr<std::int64_t> {
      long long v = 0;  // NOLINT(google-runtime-int)
      session_ << sql, soci::into(v);
      return v;
    });
  }

  soci::session& session_;
  const Dialect& dialect_;
  bool retryable_ = false;
  bool broken_ = false;
};

class SqlDatastore final : public Datastore {
 public:
  SqlDatastore(std::unique_ptr<Dialect> dialect, std::string connect, DatastoreOptions options)
      : dialect_(std::move(dialect)),
        options_(options),
        pool_(*dialect_, std::move(connect), options.pool_size, options.acquire_timeout) {}

  absl::Status ReadWriteTx(absl::FunctionRef<absl::Status(storage::ReadWriteTx&)> fn) override {
    std::minstd_rand jitter(std::random_device{}());
    absl::Status status;
    for (int attempt = 0; attempt <= options_.max_retries; ++attempt) {
      bool retryable = false;
      status = RunTx(dialect_->BeginWrite(), [&](SqlTx& tx) {
        absl::Status s = fn(tx);
        retryable = tx.retryable();
        return s;
      });
      if (status.ok() || !retryable || !absl::IsAborted(status)) return status;
      std::this_thread::sleep_for(std::chrono::milliseconds(1 + jitter() % (5 << attempt)));
    }
    return status;
  }

  absl::Status Read(absl::FunctionRef<absl::Status(Reader&)> fn) override {
    return RunTx(dialect_->BeginRead(), [&](SqlTx& tx) { return fn(tx); });
  }

  absl::Status Ping() override {
    return RunTx(dialect_->BeginRead(), [](SqlTx& tx) { return tx.Ping(); });
  }

  absl::StatusOr<std::string> GetOrCreateSecret(
      absl::string_view name, absl::FunctionRef<std::string()> generate) override {
    const std::string key(name);
    const std::string fresh = generate();
    std::string value;
    absl::Status status = ReadWriteTx([&](storage::ReadWriteTx& base) {
      absl::StatusOr<std::string> stored = static_cast<SqlTx&>(base).GetOrCreateSecret(key, fresh);
      if (!stored.ok()) return stored.status();
      value = *std::move(stored);
      return absl::OkStatus();
    });
    if (!status.ok()) return status;
    return value;
  }

  Features features() const override { return dialect_->features(); }
  absl::string_view engine() const override { return dialect_->engine(); }

 private:
  template <typename F>
  absl::Status RunTx(absl::string_view begin, F&& body) {
    // A pooled connection may have died with a database restart; that shows
    // at BEGIN, before anything ran, so one retry on a fresh connection is
    // safe for writes too.
    for (int attempt = 0;; ++attempt) {
      absl::StatusOr<SessionPool::Lease> lease = pool_.Acquire();
      if (!lease.ok()) return lease.status();
      soci::session& session = lease->session();
      SqlTx tx(session, *dialect_);
      absl::Status status = tx.Guard<bool>([&]() -> absl::StatusOr<bool> {
                                session << std::string(begin);
                                return true;
                              }).status();
      if (!status.ok()) {
        lease->Discard();
        if (absl::IsUnavailable(status) && attempt == 0) continue;
        return status;
      }
      status = body(tx);
      if (status.ok()) {
        status = tx.Guard<bool>([&]() -> absl::StatusOr<bool> {
                     session << "COMMIT";
                     return true;
                   }).status();
      } else {
        try {
          session << "ROLLBACK";
        } catch (const soci::soci_error&) {
          lease->Discard();  // the connection is in an unknown state
        }
      }
      if (tx.broken()) lease->Discard();
      return status;
    }
  }

  std::unique_ptr<Dialect> dialect_;
  DatastoreOptions options_;
  SessionPool pool_;
};

}  // namespace

std::int64_t CellInt(const SqlCell& cell, std::int64_t fallback) {
  if (!cell.has_value()) return fallback;
  if (const auto* v = std::get_if<std::int64_t>(&*cell)) return *v;
  return fallback;
}

std::string CellText(const SqlCell& cell) {
  if (!cell.has_value()) return "";
  if (const auto* v = std::get_if<std::string>(&*cell)) return *v;
  return "";
}

absl::StatusOr<std::unique_ptr<Datastore>> OpenDatastore(absl::string_view url,
                                                         const DatastoreOptions& options) {
  absl::StatusOr<std::unique_ptr<Dialect>> dialect = DialectForUrl(url);
  if (!dialect.ok()) return dialect.status();
  std::string connect = (*dialect)->ConnectString(url);
  auto store = std::make_unique<SqlDatastore>(*std::move(dialect), std::move(connect), options);
  if (absl::Status s = store->Ping(); !s.ok()) return s;
  return store;
}

}  // namespace modelvault::storage
