#include "server/scopes.h"

#include "gtest/gtest.h"

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

TEST(ScopesTest, UnknownMethodIsNotFound) {
  EXPECT_EQ(RequiredScope("/modelvault.v1.CatalogService/Nope").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace modelvault::server
