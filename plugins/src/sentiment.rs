//! `sentiment(text)`: the VADER compound sentiment score of a text, in [-1, 1], computed
//! by the `vader_sentiment` crate (a port of Hutto & Gilbert's VADER; lexicon under the
//! MIT licence). The analyzer and its lexicon are built once per process.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::LazyLock;

use rhai::plugin::*;
use rhai::FLOAT;
use vader_sentiment::SentimentIntensityAnalyzer;

use crate::num::{self, Res};

static ANALYZER: LazyLock<SentimentIntensityAnalyzer<'static>> =
    LazyLock::new(SentimentIntensityAnalyzer::new);

/// VADER compound score of `text`, in [-1, 1] (0.0 for text with no sentiment words).
/// Returns an error instead of panicking if the analyzer fails on odd input.
pub fn sentiment_score(text: &str) -> Result<f64, String> {
    catch_unwind(AssertUnwindSafe(|| {
        ANALYZER
            .polarity_scores(text)
            .get("compound")
            .copied()
            .unwrap_or(0.0)
    }))
    .map_err(|_| "sentiment(text): the analyzer failed on this text".to_string())
}

/// Rhai functions for sentiment analysis.
#[export_module(manifest)]
pub mod sentiment_functions {
    use super::*;

    /// The VADER compound sentiment score of `text`: a `FLOAT` from -1.0 (most negative)
    /// to 1.0 (most positive), 0.0 when neutral.
    ///
    /// ```rhai
    /// let s = sentiment("VADER is smart, handsome, and funny.");   // 0.83...
    /// if sentiment(ev.text) < -0.5 { emit("angry", ev) }
    /// ```
    #[rhai_fn(name = "sentiment", return_raw)]
    pub fn sentiment(text: &str) -> Res<FLOAT> {
        sentiment_score(text).or_else(num::err)
    }
}

#[cfg(test)]
mod tests {
    use crate::testutil::*;

    /// VADER's normalisation of a raw valence sum: x / sqrt(x² + 15).
    fn normalize(x: f64) -> f64 {
        x / (x * x + 15.0).sqrt()
    }

    #[test]
    fn single_words_follow_the_vader_formula() {
        // Lexicon valences from vader_lexicon.txt: good 1.9, bad -2.5.
        assert_close(eval::<f64>(r#"sentiment("good")"#), normalize(1.9), 1e-12);
        assert_close(eval::<f64>(r#"sentiment("bad")"#), normalize(-2.5), 1e-12);
        assert_close(
            eval::<f64>(r#"sentiment("The book was good.")"#),
            normalize(1.9),
            1e-12,
        );
        // Negation scales by -0.74.
        assert_close(
            eval::<f64>(r#"sentiment("not good")"#),
            normalize(1.9 * -0.74),
            1e-12,
        );
    }

    #[test]
    fn published_examples_and_range() {
        // From the VADER README.
        assert_close(
            eval::<f64>(r#"sentiment("VADER is smart, handsome, and funny.")"#),
            0.8316,
            1e-4,
        );
        assert_eq!(eval::<f64>(r#"sentiment("")"#), 0.0);
        assert_eq!(
            eval::<f64>(r#"sentiment("the table is 3 metres long")"#),
            0.0
        );
        let out: rhai::Array = eval(
            r#"[sentiment("I love this, it is wonderful and amazing!!!"),
                sentiment("This is horrible, awful, the worst thing ever."),
                sentiment("😁 💘"), sentiment("x"), sentiment("  ")]"#,
        );
        let v: Vec<f64> = out.iter().map(f).collect();
        assert!(v[0] > 0.9 && v[0] <= 1.0, "{v:?}");
        assert!(v[1] < -0.8 && v[1] >= -1.0, "{v:?}");
        assert!(v[2] > 0.0, "{v:?}");
        assert!(v.iter().all(|s| (-1.0..=1.0).contains(s)));
        // Long text stays in range.
        let long = "great ".repeat(5000);
        let s: f64 = eval_with("sentiment(t)", vec![("t", long.into())]);
        assert!(s > 0.99 && s <= 1.0);
    }

    #[test]
    fn rejects_non_strings() {
        let e = eval_err("sentiment(5)");
        assert!(e.contains("sentiment"), "{e}");
    }
}
