#include "server/seed.h"

#include "absl/strings/str_cat.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/message_differencer.h"
#include "modelvault/v1/catalog_resources.pb.h"
#include "server/validation.h"
#include "storage/embedded_files.h"

namespace modelvault::server {
namespace {

constexpr absl::string_view kBuiltIn = "migrations/seed/catalog.textproto";

// Creates or updates one resource; compares what the seed sets, ignoring
// output-only fields.
absl::Status Upsert(storage::ResourceStore& store, const google::protobuf::Message& wanted,
                    SeedReport& report) {
  const std::string name = storage::ResourceName(wanted);
  std::vector<FieldViolation> violations;
  ValidateMessage(wanted, absl::StrCat(name, "."), nullptr, violations);
  if (absl::Status s = ToStatus(std::move(violations)); !s.ok()) return s;
  storage::MutationContext ctx;
  ctx.principal = "seed";
  ctx.method = "seed";
  absl::StatusOr<std::unique_ptr<google::protobuf::Message>> current =
      store.Get(wanted.GetDescriptor(), name);
  if (absl::IsNotFound(current.status())) {
    absl::StatusOr<storage::MutationResult> created = store.Create(ctx, wanted);
    if (!created.ok()) return created.status();
    ++report.created;
    return absl::OkStatus();
  }
  if (!current.ok()) return current.status();
  std::unique_ptr<google::protobuf::Message> comparable((*current)->New());
  comparable->CopyFrom(**current);
  ClearOutputOnly(*comparable);
  comparable->GetReflection()->ClearField(comparable.get(),
                                          comparable->GetDescriptor()->FindFieldByName("etag"));
  if (google::protobuf::util::MessageDifferencer::Equals(*comparable, wanted)) {
    ++report.unchanged;
    return absl::OkStatus();
  }
  absl::StatusOr<storage::MutationResult> updated = store.Update(ctx, wanted, {"*"});
  if (!updated.ok()) return updated.status();
  ++report.updated;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<SeedReport> SeedCatalog(storage::ResourceStore& store, absl::string_view text) {
  std::string content(text);
  if (content.empty()) {
    auto it = EmbeddedFiles().find(kBuiltIn);
    if (it == EmbeddedFiles().end()) return absl::InternalError("no built-in seed catalog");
    content = std::string(it->second);
  }
  v1::CatalogSnapshot snapshot;
  if (!google::protobuf::TextFormat::ParseFromString(content, &snapshot)) {
    return absl::InvalidArgumentError("the seed file is not a valid CatalogSnapshot text proto");
  }
  SeedReport report;
  for (const auto& p : snapshot.providers()) {
    if (absl::Status s = Upsert(store, p, report); !s.ok()) return s;
  }
  for (const auto& f : snapshot.model_families()) {
    if (absl::Status s = Upsert(store, f, report); !s.ok()) return s;
  }
  for (const auto& m : snapshot.models()) {
    if (absl::Status s = Upsert(store, m, report); !s.ok()) return s;
  }
  return report;
}

}  // namespace modelvault::server
