// SplitSqlStatements, Sha256Hex and the embedded migration sets (storage/migrate.h); no
// database involved.
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "storage/migrate.h"

namespace modelvault::storage {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

TEST(SplitSqlStatementsTest, EmptyAndBlankScriptsHaveNoStatements) {
  EXPECT_THAT(SplitSqlStatements(""), IsEmpty());
  EXPECT_THAT(SplitSqlStatements("\n\n   \n\t\n"), IsEmpty());
}

TEST(SplitSqlStatementsTest, CommentOnlyScriptHasNoStatements) {
  EXPECT_THAT(SplitSqlStatements("-- a comment\n   -- an indented one\n--\n"), IsEmpty());
}

TEST(SplitSqlStatementsTest, OneStatementPerLineEndingSemicolon) {
  EXPECT_THAT(SplitSqlStatements("CREATE TABLE a (x INT);\nCREATE TABLE b (y INT);\n"),
              ElementsAre("CREATE TABLE a (x INT)", "CREATE TABLE b (y INT)"));
}

TEST(SplitSqlStatementsTest, StripsTheSemicolonAndSurroundingWhitespace) {
  EXPECT_THAT(SplitSqlStatements("   DROP TABLE a;   \n"), ElementsAre("DROP TABLE a"));
}

TEST(SplitSqlStatementsTest, MultiLineStatementKeepsItsLines) {
  EXPECT_THAT(SplitSqlStatements("CREATE TABLE a (\n  x INT,\n  y TEXT\n);\nDROP TABLE b;"),
              ElementsAre("CREATE TABLE a (\n  x INT,\n  y TEXT\n)", "DROP TABLE b"));
}

TEST(SplitSqlStatementsTest, DropsCommentsAndBlankLinesBetweenAndInsideStatements) {
  const std::vector<std::string> statements = SplitSqlStatements(
      "-- header\n"
      "\n"
      "CREATE TABLE a (\n"
      "  -- the key\n"
      "  x INT\n"
      "\n"
      ");\n"
      "  -- trailer\n");
  ASSERT_EQ(statements.size(), 1u);
  EXPECT_EQ(statements[0], "CREATE TABLE a (\n  x INT\n)");
}

TEST(SplitSqlStatementsTest, SemicolonInsideALineDoesNotSplit) {
  EXPECT_THAT(SplitSqlStatements("INSERT INTO t VALUES ('a;b');\nSELECT 1;"),
              ElementsAre("INSERT INTO t VALUES ('a;b')", "SELECT 1"));
}

TEST(SplitSqlStatementsTest, TrailingStatementWithoutSemicolonIsKept) {
  EXPECT_THAT(SplitSqlStatements("SELECT 1;\nSELECT 2\n"), ElementsAre("SELECT 1", "SELECT 2"));
  EXPECT_THAT(SplitSqlStatements("SELECT 3"), ElementsAre("SELECT 3"));
}

TEST(SplitSqlStatementsTest, DollarQuotedBodyIsOneStatement) {
  const std::vector<std::string> statements = SplitSqlStatements(
      "CREATE FUNCTION touch() RETURNS trigger AS $$\n"
      "BEGIN\n"
      "  -- keep this comment: it is part of the body\n"
      "  NEW.x := 1;\n"
      "\n"
      "  RETURN NEW;\n"
      "END;\n"
      "$$ LANGUAGE plpgsql;\n"
      "SELECT 1;\n");
  ASSERT_EQ(statements.size(), 2u);
  EXPECT_TRUE(absl::StartsWith(statements[0], "CREATE FUNCTION touch()")) << statements[0];
  EXPECT_TRUE(absl::EndsWith(statements[0], "$$ LANGUAGE plpgsql")) << statements[0];
  EXPECT_THAT(statements[0], HasSubstr("NEW.x := 1;"));
  EXPECT_THAT(statements[0], HasSubstr("RETURN NEW;\nEND;"));
  EXPECT_THAT(statements[0], HasSubstr("-- keep this comment"));
  EXPECT_EQ(statements[1], "SELECT 1");
}

TEST(SplitSqlStatementsTest, DollarQuotesOpenedAndClosedOnOneLine) {
  EXPECT_THAT(SplitSqlStatements("DO $$ BEGIN NULL; END $$;\nSELECT 2;"),
              ElementsAre("DO $$ BEGIN NULL; END $$", "SELECT 2"));
}

TEST(SplitSqlStatementsTest, EveryEmbeddedMigrationSplitsIntoWholeStatements) {
  for (const char* engine : {"postgresql", "sqlite3"}) {
    absl::StatusOr<std::vector<Migration>> migrations = EmbeddedMigrations(engine);
    ASSERT_TRUE(migrations.ok()) << migrations.status();
    for (const Migration& m : *migrations) {
      for (const std::string* script : {&m.up, &m.down}) {
        const std::vector<std::string> statements = SplitSqlStatements(*script);
        EXPECT_THAT(statements, Not(IsEmpty())) << engine << " " << m.name;
        for (const std::string& statement : statements) {
          EXPECT_TRUE(
              absl::StartsWith(statement, "CREATE ") || absl::StartsWith(statement, "DROP ") ||
              absl::StartsWith(statement, "ALTER ") || absl::StartsWith(statement, "INSERT ") ||
              absl::StartsWith(statement, "UPDATE ") || absl::StartsWith(statement, "DELETE ") ||
              absl::StartsWith(statement, "COMMENT "))
              << engine << " " << m.name << ": unexpected statement start: " << statement;
          EXPECT_FALSE(absl::EndsWith(statement, ";")) << statement;
          EXPECT_THAT(statement, Not(HasSubstr("--"))) << statement;
        }
      }
    }
  }
}

TEST(Sha256HexTest, KnownVectors) {
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(EmbeddedMigrationsTest, BothEnginesHaveTheSameVersionsInOrderWithChecksums) {
  absl::StatusOr<std::vector<Migration>> postgres = EmbeddedMigrations("postgresql");
  absl::StatusOr<std::vector<Migration>> sqlite = EmbeddedMigrations("sqlite3");
  ASSERT_TRUE(postgres.ok()) << postgres.status();
  ASSERT_TRUE(sqlite.ok()) << sqlite.status();
  ASSERT_FALSE(postgres->empty());
  ASSERT_EQ(postgres->size(), sqlite->size());
  for (size_t i = 0; i < postgres->size(); ++i) {
    const Migration& pg = (*postgres)[i];
    const Migration& lite = (*sqlite)[i];
    EXPECT_EQ(pg.version, lite.version);
    EXPECT_EQ(pg.name, lite.name);
    if (i > 0) {
      EXPECT_LT((*postgres)[i - 1].version, pg.version);
    }
    for (const Migration* m : {&pg, &lite}) {
      EXPECT_FALSE(m->up.empty()) << m->name;
      EXPECT_FALSE(m->down.empty()) << m->name;
      EXPECT_EQ(m->checksum, Sha256Hex(m->up)) << m->name;
    }
  }
  EXPECT_EQ(postgres->front().version, 1);
  EXPECT_EQ(postgres->front().name, "0001_catalog");
}

}  // namespace
}  // namespace modelvault::storage
