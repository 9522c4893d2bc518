#include "server/scopes.h"

#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/auth.h"

namespace modelvault::server {
namespace {

// Generated from the descriptors: a new RPC without a scope fails here.
TEST(ScopesTest, EveryMethodDeclaresAScope) {
  const std::vector<std::string> methods = AllMethods();
  ASSERT_GT(methods.size(), 10u);
  for (const std::string& method : methods) {
    absl::StatusOr<v1::Scope> scope = RequiredScope(method);
    EXPECT_TRUE(scope.ok()) << method << ": " << scope.status();
  }
}

TEST(ScopesTest, ReadsAndWritesDeclareTheirScopes) {
  EXPECT_EQ(*RequiredScope("/modelvault.v1.CatalogService/GetModel"), v1::SCOPE_CATALOG_READ);
  EXPECT_EQ(*RequiredScope("/modelvault.v1.CatalogService/WatchCatalog"), v1::SCOPE_CATALOG_READ);
  EXPECT_EQ(*RequiredScope("modelvault.v1.CatalogService.CreateModel"), v1::SCOPE_CATALOG_WRITE);
  EXPECT_EQ(*RequiredScope("/modelvault.v1.CatalogService/DeleteProvider"),
            v1::SCOPE_CATALOG_WRITE);
}

// AllMethods() lists the services linked into the binary; a new .proto with a
// service that is not linked there would escape every scope check, so the
// services are also read from the proto sources.
TEST(ScopesTest, EveryServiceInTheProtoSourcesIsChecked) {
  std::set<std::string> listed;
  for (const std::string& method : AllMethods()) {
    listed.insert(method.substr(1, method.rfind('/') - 1));
  }
  const std::regex service_line(R"(^service\s+(\w+)\s*\{)");
  int services = 0;
  for (const auto& entry :
       std::filesystem::directory_iterator(std::string(MV_SOURCE_DIR) + "/proto/modelvault/v1")) {
    std::ifstream in(entry.path());
    std::string line;
    while (std::getline(in, line)) {
      std::smatch match;
      if (!std::regex_search(line, match, service_line)) continue;
      ++services;
      EXPECT_TRUE(listed.count(absl::StrCat("modelvault.v1.", match[1].str())))
          << match[1] << " (" << entry.path() << ") is not in server/scopes.cc's kFiles";
    }
  }
  EXPECT_GE(services, 3);
}

TEST(ScopesTest, CredentialAndAccessMethodsDeclareTheirScopes) {
  EXPECT_EQ(*RequiredScope("/modelvault.v1.CredentialService/AcquireProviderKey"),
            v1::SCOPE_CREDENTIALS_USE);
  EXPECT_EQ(*RequiredScope("/modelvault.v1.CredentialService/GetProviderKey"),
            v1::SCOPE_CREDENTIALS_READ);
  EXPECT_EQ(*RequiredScope("/modelvault.v1.CredentialService/RotateProviderKey"),
            v1::SCOPE_CREDENTIALS_WRITE);
  EXPECT_EQ(*RequiredScope("/modelvault.v1.CredentialService/RewrapSecrets"), v1::SCOPE_ADMIN);
  EXPECT_EQ(*RequiredScope("/modelvault.v1.AccessService/CreateAccessKey"), v1::SCOPE_ADMIN);
  EXPECT_EQ(*RequiredScope("/modelvault.v1.AccessService/VerifyAccessKey"),
            v1::SCOPE_ACCESS_VERIFY);
}

TEST(ScopesTest, AdminGrantsAllAndWriteGrantsItsRead) {
  for (int s = v1::Scope_MIN; s <= v1::Scope_MAX; ++s) {
    if (s == v1::SCOPE_UNSPECIFIED) continue;
    const auto scope = static_cast<v1::Scope>(s);
    EXPECT_TRUE(Grants({v1::SCOPE_ADMIN}, scope)) << v1::Scope_Name(scope);
    EXPECT_TRUE(Grants({scope}, scope)) << v1::Scope_Name(scope);
  }
  EXPECT_TRUE(Grants({v1::SCOPE_CATALOG_WRITE}, v1::SCOPE_CATALOG_READ));
  EXPECT_TRUE(Grants({v1::SCOPE_CREDENTIALS_WRITE}, v1::SCOPE_CREDENTIALS_READ));
  EXPECT_FALSE(Grants({v1::SCOPE_CATALOG_READ}, v1::SCOPE_CATALOG_WRITE));
  EXPECT_FALSE(Grants({v1::SCOPE_CREDENTIALS_READ}, v1::SCOPE_CREDENTIALS_USE));
  EXPECT_FALSE(Grants({v1::SCOPE_CREDENTIALS_WRITE}, v1::SCOPE_CREDENTIALS_USE));
  EXPECT_FALSE(Grants({v1::SCOPE_CATALOG_WRITE}, v1::SCOPE_ADMIN));
  EXPECT_FALSE(Grants({}, v1::SCOPE_CATALOG_READ));
}

TEST(ScopesTest, UnknownMethodIsNotFound) {
  EXPECT_EQ(RequiredScope("/modelvault.v1.CatalogService/Nope").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace modelvault::server
