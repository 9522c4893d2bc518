#include "server/validation.h"

#include "google/rpc/error_details.pb.h"
#include "gtest/gtest.h"
#include "modelvault/v1/catalog_resources.pb.h"
#include "server/catalog_service.h"

namespace modelvault::server {
namespace {

v1::Model ValidModel() {
  v1::Model m;
  m.set_name("providers/openai/models/gpt-4o");
  m.set_display_name("GPT-4o");
  m.set_family("providers/openai/modelFamilies/gpt-4o");
  m.set_context_window(128000);
  m.set_max_output_tokens(16384);
  auto* p = m.add_prices();
  p->mutable_effective_time()->set_seconds(1735689600);
  p->set_input(2500000000);
  p->set_output(10000000000);
  return m;
}

std::vector<FieldViolation> Check(const v1::Model& m) {
  std::vector<FieldViolation> out;
  ValidateMessage(m, "model.", nullptr, out);
  CheckModel(m, "model.", out);
  return out;
}

bool Names(const std::vector<FieldViolation>& v, const std::string& field) {
  for (const auto& x : v) {
    if (x.field == field) return true;
  }
  return false;
}

TEST(ValidationTest, ValidModelPasses) { EXPECT_TRUE(Check(ValidModel()).empty()); }

TEST(ValidationTest, RequiredAndLengths) {
  v1::Model m = ValidModel();
  m.clear_display_name();
  EXPECT_TRUE(Names(Check(m), "model.display_name"));
  m.set_display_name(std::string(129, 'x'));
  EXPECT_TRUE(Names(Check(m), "model.display_name"));
  m.set_display_name(std::string(128, 'x'));
  EXPECT_TRUE(Check(m).empty());
  // Length counts code points, not bytes: 128 two-byte characters fit.
  std::string wide;
  for (int i = 0; i < 128; ++i) wide += "\xc3\xa9";
  m.set_display_name(wide);
  EXPECT_TRUE(Check(m).empty());
}

TEST(ValidationTest, InvalidUtf8AndNul) {
  EXPECT_FALSE(IsValidUtf8("\xff\xfe"));
  EXPECT_FALSE(IsValidUtf8("\xc0\x80"));          // overlong NUL
  EXPECT_FALSE(IsValidUtf8("\xed\xa0\x80"));      // surrogate
  EXPECT_FALSE(IsValidUtf8("\xf4\x90\x80\x80"));  // above U+10FFFF
  EXPECT_TRUE(IsValidUtf8("gpt-4o \xe2\x9c\x93"));
  v1::Model m = ValidModel();
  m.set_display_name(std::string("a\0b", 3));
  EXPECT_TRUE(Names(Check(m), "model.display_name"));
}

TEST(ValidationTest, NumbersAndPrices) {
  v1::Model m = ValidModel();
  m.set_context_window(-1);
  EXPECT_TRUE(Names(Check(m), "model.context_window"));
  m = ValidModel();
  m.set_context_window(1000000000000);
  EXPECT_TRUE(Names(Check(m), "model.context_window"));
  m = ValidModel();
  m.mutable_prices(0)->set_input(-5);
  EXPECT_TRUE(Names(Check(m), "model.prices[0].input"));
  m = ValidModel();
  m.mutable_prices(0)->set_output(2500000000000000);  // $2.5M per Mtok: a unit mistake
  auto v = Check(m);
  ASSERT_TRUE(Names(v, "model.prices[0].output"));
  EXPECT_NE(v[0].description.find("nano-USD"), std::string::npos);
  m = ValidModel();
  m.mutable_prices(0)->clear_effective_time();
  EXPECT_TRUE(Names(Check(m), "model.prices[0].effective_time"));
}

TEST(ValidationTest, ModelRules) {
  v1::Model m = ValidModel();
  m.set_family("providers/anthropic/modelFamilies/claude");
  EXPECT_TRUE(Names(Check(m), "model.family"));
  m = ValidModel();
  m.set_family("not a name");
  EXPECT_TRUE(Names(Check(m), "model.family"));
  m = ValidModel();
  *m.add_prices() = m.prices(0);
  EXPECT_TRUE(Names(Check(m), "model.prices[1].effective_time"));
}

TEST(ValidationTest, UrlFormat) {
  v1::Provider p;
  p.set_display_name("X");
  for (const char* bad : {"ftp://x", "https://", "http://a b", "localhost:8080"}) {
    p.set_base_url(bad);
    std::vector<FieldViolation> out;
    ValidateMessage(p, "provider.", nullptr, out);
    EXPECT_TRUE(Names(out, "provider.base_url")) << bad;
  }
  p.set_base_url("http://localhost:11434/v1");
  std::vector<FieldViolation> out;
  ValidateMessage(p, "provider.", nullptr, out);
  EXPECT_TRUE(out.empty());
}

TEST(ValidationTest, MaskLimitsTheCheckedFields) {
  v1::Model m;
  m.set_name("providers/openai/models/gpt-4o");
  m.set_context_window(5);
  std::vector<std::string> paths = {"context_window"};
  std::vector<FieldViolation> out;
  ValidateMessage(m, "model.", &paths, out);
  EXPECT_TRUE(out.empty()) << "display_name is required but not in the mask";
}

TEST(ValidationTest, IdsAndRequestIds) {
  std::vector<FieldViolation> out;
  ValidateId("model_id", "gpt-4o", out);
  ValidateId("model_id", "llama-3.1-8b", out);
  EXPECT_TRUE(out.empty());
  for (const char* bad : {"", "GPT", "-a", "a-", "a/b", "a b"}) {
    out.clear();
    ValidateId("model_id", bad, out);
    EXPECT_EQ(out.size(), 1u) << bad;
  }
  ValidateId("model_id", std::string(64, 'a'), out);
  out.clear();
  ValidateRequestId("4f1c1a0e-7a3c-4c41-9e55-2f7d0d3b7c10", out);
  EXPECT_TRUE(out.empty());
  ValidateRequestId(std::string(129, 'a'), out);
  ValidateRequestId("has space", out);
  EXPECT_EQ(out.size(), 2u);
}

TEST(ValidationTest, ToStatusCarriesBadRequest) {
  absl::Status s = ToStatus({{"model.context_window", "must be at least 0"}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  auto payload = s.GetPayload(kBadRequestUrl);
  ASSERT_TRUE(payload.has_value());
  google::rpc::BadRequest detail;
  ASSERT_TRUE(detail.ParseFromString(std::string(*payload)));
  ASSERT_EQ(detail.field_violations_size(), 1);
  EXPECT_EQ(detail.field_violations(0).field(), "model.context_window");
}

TEST(PriceAtTest, PicksTheLatestEffectiveEntry) {
  v1::Model m = ValidModel();
  auto* later = m.add_prices();
  later->mutable_effective_time()->set_seconds(1750000000);
  later->set_input(1);
  EXPECT_EQ(PriceAt(m, absl::FromUnixSeconds(1740000000))->input(), 2500000000);
  EXPECT_EQ(PriceAt(m, absl::FromUnixSeconds(1750000000))->input(), 1);
  EXPECT_EQ(PriceAt(m, absl::FromUnixSeconds(1800000000))->input(), 1);
  EXPECT_EQ(PriceAt(m, absl::FromUnixSeconds(1000000000)).status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace modelvault::server
