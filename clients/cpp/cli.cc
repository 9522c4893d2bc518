#include "clients/cpp/cli.h"

#include <cstdio>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "clients/cpp/catalog_client.h"
#include "clients/cpp/channel.h"
#include "google/protobuf/util/json_util.h"
#include "server/config.h"

namespace modelvault::client {
namespace {

constexpr char kUsage[] = R"(usage:
  modelvault providers list [--filter F] [--target ADDR] [--json]
  modelvault models list [--parent providers/P] [--filter F] [--order-by O] [--target ADDR] [--json]
  modelvault models get NAME [--target ADDR]
ADDR defaults to $MODELVAULT_TARGET or 127.0.0.1:50051. The access key comes from
$MODELVAULT_TOKEN, else the file named by --token-file or $MODELVAULT_TOKEN_FILE.
TLS: --tls-ca PEM (server roots) [--tls-cert PEM --tls-key PEM (mTLS)] [--tls-server-name N].
)";

int Fail(const absl::Status& status) {
  std::cerr << "error: " << absl::StatusCodeToString(status.code()) << ": " << status.message()
            << "\n";
  return 1;
}

std::string Dollars(std::int64_t nano_usd) {
  return absl::StrFormat("$%.2f", static_cast<double>(nano_usd) / 1e9);
}

void PrintJson(const google::protobuf::Message& m) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  (void)google::protobuf::util::MessageToJsonString(m, &json, options);
  std::cout << json;
}

}  // namespace

int RunCatalogCommand(const std::string& noun, const std::vector<std::string>& args) {
  absl::StatusOr<server::Flags> flags =
      server::Flags::Parse(args,
                           {"target", "filter", "parent", "order-by", "json", "token-file",
                            "tls-ca", "tls-cert", "tls-key", "tls-server-name"},
                           {"json"});
  if (!flags.ok() || flags->positional().empty()) {
    std::cerr << (flags.ok() ? "" : std::string(flags.status().message()) + "\n") << kUsage;
    return 2;
  }
  const std::string verb = flags->positional()[0];
  absl::StatusOr<std::string> token = TokenFromEnvironment(flags->Get("token-file"));
  if (!token.ok()) return Fail(token.status());
  ChannelOptions options;
  options.token = *token;
  options.tls_ca_file = flags->Get("tls-ca");
  options.tls_cert_file = flags->Get("tls-cert");
  options.tls_key_file = flags->Get("tls-key");
  options.tls_server_name = flags->Get("tls-server-name");
  absl::StatusOr<std::unique_ptr<CatalogClient>> connected =
      CatalogClient::Connect(flags->Get("target", "127.0.0.1:50051"), options);
  if (!connected.ok()) return Fail(connected.status());
  std::unique_ptr<CatalogClient>& client = *connected;
  const bool json = flags->Has("json");
  if (noun == "providers" && verb == "list") {
    auto providers = client->ListAllProviders(flags->Get("filter"));
    if (!providers.ok()) return Fail(providers.status());
    if (!json) std::printf("%-28s %-24s %-8s %s\n", "NAME", "DISPLAY NAME", "ENABLED", "BASE URL");
    for (const auto& p : *providers) {
      if (json) {
        PrintJson(p);
        continue;
      }
      std::printf("%-28s %-24s %-8s %s\n", p.name().c_str(), p.display_name().c_str(),
                  p.enabled() ? "yes" : "no", p.base_url().c_str());
    }
    return 0;
  }
  if (noun == "models" && verb == "list") {
    auto models = client->ListAllModels(flags->Get("parent", "providers/-"), flags->Get("filter"),
                                        flags->Get("order-by"));
    if (!models.ok()) return Fail(models.status());
    if (!json) {
      std::printf("%-48s %-10s %-10s %-12s %s\n", "NAME", "CONTEXT", "MAX OUT", "IN $/MTOK",
                  "OUT $/MTOK");
    }
    for (const auto& m : *models) {
      if (json) {
        PrintJson(m);
        continue;
      }
      const auto& price = m.prices().empty() ? v1::ModelPrice() : *m.prices().rbegin();
      std::printf("%-48s %-10lld %-10lld %-12s %s\n", m.name().c_str(),
                  static_cast<long long>(m.context_window()),     // NOLINT(google-runtime-int)
                  static_cast<long long>(m.max_output_tokens()),  // NOLINT(google-runtime-int)
                  Dollars(price.input()).c_str(), Dollars(price.output()).c_str());
    }
    return 0;
  }
  if (noun == "models" && verb == "get" && flags->positional().size() == 2) {
    auto model = client->GetModel(flags->positional()[1]);
    if (!model.ok()) return Fail(model.status());
    PrintJson(*model);
    return 0;
  }
  std::cerr << kUsage;
  return 2;
}

}  // namespace modelvault::client
