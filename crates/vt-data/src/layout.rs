//! Recognises the Kaggle folder layout (`seg_train/seg_train/<class>/x.jpg`,
//! `seg_test/seg_test/<class>/x.jpg`, `seg_pred/seg_pred/x.jpg`), with or without the doubled
//! folder names and under any wrapper folder, for zips and extracted folders alike.

use std::path::Path;

use crate::image_files::is_image_name;

/// Which split of the source an image belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// `seg_train`: later split into train and val.
    Train(String),
    /// `seg_test`.
    Test(String),
    /// `seg_pred`: unlabelled.
    Pred,
}

impl Role {
    pub fn class(&self) -> Option<&str> {
        match self {
            Role::Train(c) | Role::Test(c) => Some(c),
            Role::Pred => None,
        }
    }
}

/// Where a source path goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    Image {
        role: Role,
        name: String,
    },
    /// Not part of the data set (README, `__MACOSX/`, dot files): left out silently.
    Ignore,
    /// Looks like part of the data set but cannot be placed: reported as skipped.
    Unplaced(String),
}

/// Why an image file outside the split folders is not imported.
pub const OUTSIDE_SPLITS: &str = "not in seg_train/, seg_test/ or seg_pred/: not imported";
/// Why an entry whose path holds `..` is not imported.
pub const CLIMBS_OUT: &str = "its path goes up a folder (..): not imported";

/// Places a '/'-separated path relative to the source root.
pub fn place(rel: &str) -> Placement {
    // `.` is the current folder (bsdtar and Windows zips start entries with `./`); other
    // names starting with a dot are hidden files, ignored below.
    let parts: Vec<&str> = rel
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    // Before the hidden files, which `..` would pass for: an archive's entry that climbs
    // out of its folders is no image of the data set, and may be an attack.
    if parts.contains(&"..") {
        return Placement::Unplaced(CLIMBS_OUT.into());
    }
    if parts
        .iter()
        .any(|p| p.starts_with('.') || *p == "__MACOSX" || *p == "Thumbs.db")
    {
        return Placement::Ignore;
    }
    let Some(i) = parts
        .iter()
        .position(|p| matches!(*p, "seg_train" | "seg_test" | "seg_pred"))
    else {
        // An image is reported (a `val/` or `train/` folder of another layout), other files
        // (a README) are not.
        return match parts.last() {
            Some(name) if is_image_name(Path::new(name)) => {
                Placement::Unplaced(OUTSIDE_SPLITS.into())
            }
            _ => Placement::Ignore,
        };
    };
    let mut j = i + 1;
    if parts.get(j) == Some(&parts[i]) {
        j += 1;
    }
    let rest = &parts[j.min(parts.len())..];
    let Some(name) = rest.last().map(|s| s.to_string()) else {
        return Placement::Ignore;
    };
    match parts[i] {
        "seg_pred" => Placement::Image {
            role: Role::Pred,
            name,
        },
        split => {
            if rest.len() < 2 {
                return Placement::Unplaced(format!("{split} image outside a class folder"));
            }
            let class = rest[0].to_string();
            let role = if split == "seg_train" {
                Role::Train(class)
            } else {
                Role::Test(class)
            };
            Placement::Image { role, name }
        }
    }
}

/// Whether a folder (a '/'-separated path relative to the source root) lies outside the
/// layout: in no `seg_train`, `seg_test` or `seg_pred` folder, its files imported nowhere.
pub fn outside_the_layout(rel: &str) -> bool {
    place(&format!("{rel}/_")) == Placement::Ignore
}

/// Where the files of a folder (a '/'-separated path relative to the source root) go: a
/// class of `seg_train` or `seg_test`, or `seg_pred`; None outside them.
pub fn role_of_folder(rel: &str) -> Option<Role> {
    match place(&format!("{rel}/_")) {
        Placement::Image { role, .. } => Some(role),
        _ => None,
    }
}

/// The class of a folder (a '/'-separated path relative to the source root) that holds or
/// lies within a `seg_train` class folder: that of any file placed in it.
pub fn train_class_of_folder(rel: &str) -> Option<String> {
    match role_of_folder(rel) {
        Some(Role::Train(class)) => Some(class),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(role: Role, name: &str) -> Placement {
        Placement::Image {
            role,
            name: name.into(),
        }
    }

    #[test]
    fn kaggle_doubled_and_plain_layouts() {
        assert_eq!(
            place("seg_train/seg_train/forest/1.jpg"),
            image(Role::Train("forest".into()), "1.jpg")
        );
        assert_eq!(
            place("archive/seg_test/seg_test/sea/2.jpg"),
            image(Role::Test("sea".into()), "2.jpg")
        );
        assert_eq!(place("seg_pred/seg_pred/3.jpg"), image(Role::Pred, "3.jpg"));
        assert_eq!(
            place("seg_train/street/4.jpg"),
            image(Role::Train("street".into()), "4.jpg")
        );
        assert_eq!(place("seg_pred/7606.jpg"), image(Role::Pred, "7606.jpg"));
        assert_eq!(
            place("./seg_train/./seg_train/forest/1.jpg"),
            image(Role::Train("forest".into()), "1.jpg")
        );
    }

    #[test]
    fn noise_is_ignored_and_strays_reported() {
        assert_eq!(place("README.md"), Placement::Ignore);
        assert_eq!(place("notes/plan.txt"), Placement::Ignore);
        for stray in ["val/forest/1.jpg", "archive/preview.PNG"] {
            assert_eq!(place(stray), Placement::Unplaced(OUTSIDE_SPLITS.into()));
        }
        assert_eq!(
            place("__MACOSX/seg_train/forest/._1.jpg"),
            Placement::Ignore
        );
        assert_eq!(place("seg_train/forest/.DS_Store"), Placement::Ignore);
        assert_eq!(place("./seg_train/forest/.DS_Store"), Placement::Ignore);
        for climbing in [
            "seg_train/../forest/1.jpg",
            "seg_train/a/../../evil.jpg",
            "../x.jpg",
            "seg_train/a/../.hidden",
        ] {
            assert_eq!(
                place(climbing),
                Placement::Unplaced(CLIMBS_OUT.into()),
                "{climbing}"
            );
        }
        assert_eq!(place("seg_train/seg_train/"), Placement::Ignore);
        assert!(matches!(place("seg_train/5.jpg"), Placement::Unplaced(_)));
    }

    #[test]
    fn class_folders() {
        let class = |rel| train_class_of_folder(rel);
        assert_eq!(class("seg_train/seg_train/forest"), Some("forest".into()));
        assert_eq!(class("x/seg_train/sea/"), Some("sea".into()));
        for none in [
            "seg_train",
            "seg_train/seg_train",
            "seg_test/seg_test/sea",
            "a",
        ] {
            assert_eq!(class(none), None, "{none}");
        }
    }
}
